"""lm-eval's ``custom_dataset`` hook for the offline tasks: the JSON file beside this one, as a test split.

lm-eval resolves ``!function loader.load`` relative to the task YAML, so the data is found wherever the
repository (or the installed package) is, whatever the working directory; ``dataset_path: json`` with
``data_files`` would resolve against the working directory instead.
"""

from pathlib import Path


def load(data_file: str, **_metadata):
    """``dataset_kwargs: {data_file: NAME}``; lm-eval also passes the task's metadata (version), unused."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(Path(__file__).resolve().parent / data_file))})
