"""SST-2 in its GLUE TSV form (`sentence<TAB>label`), tokenized with `datasets`. Shared by the examples."""

from __future__ import annotations

from pathlib import Path

from datasets import load_dataset


def load_sst2(data_dir: str | Path, tokenizer, train_samples: int | None = None, max_length: int = 64, seed: int = 0):
    data_dir = Path(data_dir)
    files = {split: data_dir / f"{split}.tsv" for split in ("train", "dev")}
    for split, path in files.items():
        if not path.is_file():
            raise FileNotFoundError(
                f"SST-2 {split} file not found: {path}. Pass --data-dir pointing at a GLUE SST-2 folder "
                "(train.tsv and dev.tsv with a 'sentence<TAB>label' header)"
            )
    raw = load_dataset("csv", data_files={k: str(v) for k, v in files.items()}, delimiter="\t", quoting=3)
    for split in raw:
        missing = {"sentence", "label"} - set(raw[split].column_names)
        if missing:
            raise ValueError(f"{files[split]} lacks column(s) {sorted(missing)}; expected 'sentence<TAB>label'")
    train = raw["train"].shuffle(seed=seed)
    if train_samples:
        train = train.select(range(min(train_samples, len(train))))

    def tokenize(batch):
        enc = tokenizer(batch["sentence"], truncation=True, max_length=max_length)
        enc["labels"] = batch["label"]
        return enc

    columns = ["sentence", "label"]
    train = train.map(tokenize, batched=True, remove_columns=columns)
    dev = raw["dev"].map(tokenize, batched=True, remove_columns=columns)
    return train, dev
