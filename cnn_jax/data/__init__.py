"""The data: the dataset registry, readers of the official files, the loader of the first source
found, augmentation."""
