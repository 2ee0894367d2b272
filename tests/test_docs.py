"""README.md, WORKSPACE.md and docs/ against the code: the lists of datasets, model families and
lowerings match the registries, every module path and dotted name they give exists, every flag
value they use is one the config accepts, each page stays short, and no page narrates history.

Text checks only (no training, no data): the whole file runs in about a second."""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest

from cnn_jax import config, models
from cnn_jax.data import registry

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", ROOT / "WORKSPACE.md", *DOCS]
PAGE_IDS = [str(p.relative_to(ROOT)) for p in PAGES]

DOCS_PAGE_LIMIT = 12_000        # bytes: a page read in one sitting
WORKSPACE_LIMIT = 15_000
# Words of history and of who measured: the docs are a reference (history goes to CHANGELOG.md).
BANNED = re.compile(r"this session|earlier session|not drawn|was lent|issue [0-9]+|earlier run|"
                    r"was not reachable|this hour|sigstop|before the fix|not recorded", re.IGNORECASE)
PLACEHOLDERS = ("NAME", "<", "*", "test_x.", "OUT")


def _text(page: pathlib.Path) -> str:
    return page.read_text(encoding="utf-8")


def _table(page: pathlib.Path, header: str) -> list[str]:
    """The first cells of the rows of the markdown table in `page` whose first header cell is `header`."""
    lines = _text(page).splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("|") and line.strip().strip("|").split("|")[0].strip() == header:
            rows = []
            for row in lines[i + 2:]:
                if not row.lstrip().startswith("|"):
                    break
                rows.append(row.strip().strip("|").split("|")[0].strip())
            return rows
    raise AssertionError(f"{page.name}: no table headed {header!r}")


def _names(cells: list[str]) -> list[str]:
    """The first `code` name of each cell."""
    names = []
    for cell in cells:
        found = re.findall(r"`([^`]+)`", cell)
        assert found, f"table cell {cell!r} names nothing in backticks"
        names.append(found[0])
    return names


def _paragraph(page: pathlib.Path, start: str) -> str:
    text = _text(page)
    i = text.index(start)
    end = text.find("\n\n", i)
    return text[i:end if end >= 0 else len(text)]


def _same(listed: list[str], registered, where: str) -> None:
    assert len(listed) == len(set(listed)), f"{where} lists a name twice: {listed}"
    assert set(listed) == set(registered), (
        f"{where}: missing {sorted(set(registered) - set(listed))}, unknown {sorted(set(listed) - set(registered))}")


# --- The lists, against the registries ---------------------------------------------------------

def test_the_dataset_lists_are_the_registry():
    _same(_names(_table(ROOT / "docs" / "data.md", "`--dataset`")), registry.NAMES, "docs/data.md's dataset table")
    readme = _paragraph(ROOT / "README.md", "Datasets: ")
    _same(re.findall(r"`([a-z0-9_]+)`", readme[:readme.index("(`--dataset`")]), registry.NAMES,
          "README's Datasets line")


def test_the_model_family_lists_are_the_registry():
    _same(_names(_table(ROOT / "docs" / "lowering.md", "`--model`")), tuple(models.FAMILIES),
          "docs/lowering.md's family table")
    readme = _paragraph(ROOT / "README.md", "Model families (`--model`):")
    _same(re.findall(r"(?:\):|;) `([a-z0-9_]+)`,", readme), tuple(models.FAMILIES), "README's Model families paragraph")


def test_the_lowering_lists_are_the_config_choices():
    lowering = ROOT / "docs" / "lowering.md"
    _same(_names(_table(lowering, "`--conv_impl`")), config.CONV_IMPLS, "docs/lowering.md's --conv_impl table")
    _same(_names(_table(lowering, "`--pool_impl`")), config.POOL_IMPLS, "docs/lowering.md's --pool_impl table")


# Values a page may give a flag: the registries', and the spellings of old commits that provenance
# lines quote (config.RENAMED_*, which the config still accepts with a hint).
FLAG_VALUES = {
    "dataset": set(registry.NAMES),
    "model": set(models.FAMILIES),
    "conv_impl": set(config.CONV_IMPLS),
    "pool_impl": set(config.POOL_IMPLS),
    "preset": set(config.PRESETS) | set(config.RENAMED_PRESETS),
    "layout": set(config.LAYOUTS),
    "loop": set(config.LOOPS),
    "ynnpack": set(config.YNNPACK),
    "pool": set(config.POOLS),
    "optimizer": set(config.OPTIMIZERS) | set(config.RENAMED_VALUES.get("optimizer", {})),
    "init": set(config.INITS) | set(config.RENAMED_VALUES.get("init", {})),
}
# The start-up line's names: `strategy: conv=... pool=...` (resolved choices, no `auto`).
STRATEGY_VALUES = {"conv": set(config.CONV_IMPLS) - {"auto"},
                   "pool": (set(config.POOL_IMPLS) - {"auto"}) | {"global_mean"},
                   "layout": set(config.LAYOUTS) - {"auto"}, "loop": set(config.LOOPS) - {"auto"},
                   "ynnpack": set(config.YNNPACK) - {"auto"}}


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_flag_value_a_page_uses_is_one_the_config_accepts(page):
    text = _text(page)
    unknown = [f"--{flag}={value}" for flag, allowed in FLAG_VALUES.items()
               for value in re.findall(rf"--{flag}=([A-Za-z0-9_]+)", text)
               if value not in allowed and not (value.isupper() and flag != "layout")]   # POOL, MODEL: placeholders
    for line in re.findall(r"strategy: ([^`\n]+)", text):
        for key, value in re.findall(r"\b(conv|pool|layout|loop|ynnpack)=([A-Za-z_]+)", line):
            if value not in STRATEGY_VALUES[key]:
                unknown.append(f"strategy {key}={value}")
    assert not unknown, f"{page.name} names values the config lacks: {unknown}"


# --- Paths and names, against the code ---------------------------------------------------------

PATH = re.compile(r"(?<![\w/.~$-])((?:cnn_jax|tests|experiments|notebooks|docs)/[^\s`)\]'\",;:]*)")
DOTTED = re.compile(r"(?<![\w/.])(cnn_jax(?:\.[A-Za-z_]\w*)+)")


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_path_a_page_names_exists(page):
    missing = []
    for path in PATH.findall(_text(page)):
        path = path.rstrip(".")
        if any(p in path for p in PLACEHOLDERS):
            continue
        if not (ROOT / path).exists():
            missing.append(path)
    assert not missing, f"{page.name} names paths that do not exist: {sorted(set(missing))}"


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


# Short names in code spans (`lowering.resolve`, `sweep.PER_RUN_FIELDS`): the module each first part means.
SHORT = {"config": "cnn_jax.config", "cli": "cnn_jax.cli", "model": "cnn_jax.model", "run": "cnn_jax.run",
         "data": "cnn_jax.data", "sources": "cnn_jax.data.sources", "registry": "cnn_jax.data.registry",
         "nn": "cnn_jax.nn", "layers": "cnn_jax.nn.layers", "lowering": "cnn_jax.nn.lowering",
         "onednn": "cnn_jax.nn.onednn", "models": "cnn_jax.models", "cnn_blocks": "cnn_jax.models.cnn_blocks",
         "engine": "cnn_jax.engine", "state": "cnn_jax.engine.state", "step": "cnn_jax.engine.step",
         "optim": "cnn_jax.engine.optim", "program": "cnn_jax.engine.program", "loop": "cnn_jax.engine.loop",
         "compile_cache": "cnn_jax.engine.compile_cache", "train": "cnn_jax.engine.train",
         "rundir": "cnn_jax.rundir", "checkpoint": "cnn_jax.rundir.checkpoint", "sweep": "cnn_jax.sweep",
         "search": "cnn_jax.search"}
SHORT_NAME = re.compile(r"`(?:[^`]*?[\s(])?((?:" + "|".join(SHORT) + r")(?:\.[A-Za-z_]\w*)+)")
FILE_SUFFIXES = {"json", "jsonl", "md", "py", "png", "csv", "db", "txt", "lock", "yaml", "bin"}


def _names_given(text: str) -> set[str]:
    names = set(DOTTED.findall(text))
    for short in SHORT_NAME.findall(text):
        first, rest = short.split(".", 1)
        if rest.rsplit(".", 1)[-1] not in FILE_SUFFIXES:
            names.add(f"{SHORT[first]}.{rest}")
    return {n for n in names if not any(p in n for p in PLACEHOLDERS)}


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_cnn_jax_name_a_page_gives_exists(page):
    missing = sorted(name for name in _names_given(_text(page)) if not _resolves(name))
    assert not missing, f"{page.name} names what cnn_jax lacks: {missing}"


# --- A reference, not a notebook ----------------------------------------------------------------

@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_each_docs_page_is_read_in_one_sitting(page):
    assert page.stat().st_size < DOCS_PAGE_LIMIT, (
        f"docs/{page.name} is {page.stat().st_size} bytes, over {DOCS_PAGE_LIMIT}: keep one current table per "
        f"topic and CPU model, and move history to CHANGELOG.md")


def test_workspace_md_stays_short():
    assert (ROOT / "WORKSPACE.md").stat().st_size < WORKSPACE_LIMIT


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_no_page_narrates_history(page):
    found = sorted({m.group(0).lower() for m in BANNED.finditer(_text(page))})
    assert not found, f"{page.name} says {found}: state what is, with its provenance; history goes to CHANGELOG.md"


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The helpers fail on a list with a name the registry lacks, a missing one, a stale path."""
    page = tmp_path / "page.md"
    page.write_text("| `--dataset` | x |\n| --- | --- |\n| `mnist` | a |\n| `svhn` | b |\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="missing .*unknown .*svhn"):
        _same(_names(_table(page, "`--dataset`")), registry.NAMES, "page")
    assert not _resolves("cnn_jax.data.no_such_module.load")
    assert _resolves("cnn_jax.engine.loop.train_runs")
    assert _names_given("`data.load(config)` and `lowering.resolve`, `config.json`") == {
        "cnn_jax.data.load", "cnn_jax.nn.lowering.resolve"}
    assert not _resolves("cnn_jax.data.load")
    assert BANNED.search("Measured in an earlier run") and BANNED.search("see Issue 30")
