"""The network's building blocks below every model family: layers, lowerings, oneDNN."""
