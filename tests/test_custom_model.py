"""Custom open_clip models (`--model FILE.json`, issue 15): private registration that never shadows a built-in,
the config recorded in the index (later commands need no file), refusals in one line, and the whole CLI (ONNX
search, captions, info, eval, train-reranker, the page) on a tiny ViT config with seeded random weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from retrieval.errors import ModelConfigError, ModelMismatch, ModelUnavailable, UserError
from retrieval.model.custom_config import read_config, register
from retrieval.model.recorded import requested_spec
from retrieval.model.spec import Fingerprint, ModelSpec, fingerprint_for
from tests.helpers import GOOD, cli_in_process, make_checkpoint, run_cli

TINY: dict[str, Any] = {  # a ViT-B-32 in miniature: 32 px images, 8 px patches, 2 layers of width 64 per tower
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def tiny(**changes: Any) -> dict[str, Any]:
    """TINY with `section__key=value` (or top-level `key=value`) changed; None deletes the key."""
    cfg = json.loads(json.dumps(TINY))
    for name, value in changes.items():
        where, key = (cfg[name.split("__")[0]], name.split("__")[1]) if "__" in name else (cfg, name)
        if value is None:
            where.pop(key, None)
        else:
            where[key] = value
    return cfg


def write(path: Path, cfg: Any) -> Path:
    path.write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return path


class Record:
    """A model record as an index holds it (recorded.ModelRecord), without a store."""

    def __init__(self, fp: Fingerprint | None, home: Path = Path(".")) -> None:
        self.fingerprint, self.home = fp, home

    def checkpoint_stat(self) -> dict[str, int] | None:
        return None

    def get_meta(self, key: str) -> str | None:
        return None


@pytest.fixture(scope="module")
def custom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config file, seeded checkpoint of that config) in a folder of their own."""
    folder = tmp_path_factory.mktemp("custom-model")
    cfg = write(folder / "my_clip.json", TINY)
    name = register(read_config(cfg))
    return cfg, make_checkpoint(folder / "my_clip.pt", model=name)


# ---- registration, canonical sha256, the fingerprint --------------------------------------------------
def test_a_file_named_like_a_builtin_never_replaces_it(tmp_path: Path) -> None:
    import open_clip

    before = open_clip.get_model_config("ViT-B-32")
    config = read_config(write(tmp_path / "ViT-B-32.json", TINY))
    name = register(config)
    assert open_clip.get_model_config("ViT-B-32") == before and before["embed_dim"] == 512
    assert name == config.name and name.startswith("custom-") and name != "ViT-B-32"
    assert open_clip.get_model_config(name) == TINY and name in open_clip.list_models()
    assert open_clip.get_tokenizer(name).context_length == 77  # CLIP's BPE, from the registered config


def test_tokenizer_settings_a_query_can_reproduce(tmp_path: Path) -> None:
    """clean modes and special tokens (with the vocabulary to hold them) reach CLIP's BPE tokenizer."""
    import open_clip

    kwargs = {"clean": "canonicalize", "additional_special_tokens": ["<x>"]}
    cfg = tiny(text_cfg__tokenizer_kwargs=kwargs, text_cfg__vocab_size=49409, text_cfg__context_length=32)
    tok = open_clip.get_tokenizer(register(read_config(write(tmp_path / "t.json", cfg))))
    assert type(tok) is open_clip.tokenizer.SimpleTokenizer and tok.context_length == 32
    assert tok.clean_fn is open_clip.tokenizer._clean_canonicalize and tok.encoder["<x>"] == 49408


def test_sha256_is_of_the_content_not_the_formatting(tmp_path: Path) -> None:
    a = read_config(write(tmp_path / "a.json", TINY))
    pretty = {"text_cfg": TINY["text_cfg"], "vision_cfg": TINY["vision_cfg"], "embed_dim": 64}
    b = read_config(write(tmp_path / "b.json", json.dumps(pretty, indent=4)))
    c = read_config(write(tmp_path / "c.json", tiny(vision_cfg__layers=3)))
    assert (a.sha256, a.name, a.text) == (b.sha256, b.name, b.text) and a.source != b.source
    assert c.sha256 != a.sha256 and c.name != a.name


def test_fingerprint_records_the_config_and_keeps_builtin_records(tmp_path: Path) -> None:
    config = read_config(write(tmp_path / "m.json", TINY))
    other = read_config(write(tmp_path / "n.json", tiny(text_cfg__layers=3)))
    builtin = fingerprint_for(ModelSpec("ViT-B-32", "laion2b_s34b_b79k"), 512)
    assert set(json.loads(builtin.to_json())) == {"model", "pretrained", "weights", "dim"}  # as older versions wrote
    assert builtin.cache_id() == "ViT-B-32|laion2b_s34b_b79k|512"  # export, vocabulary and token keys unchanged
    fp = fingerprint_for(ModelSpec(config.name, "laion2b_s34b_b79k", config=config), 64)
    assert fp.config == f"sha256:{config.sha256}" and fp.config_json == config.text
    assert fp.config_file == str((tmp_path / "m.json").resolve())
    assert Fingerprint.from_json(fp.to_json()) == fp and "m.json" in fp.describe()
    twin = fingerprint_for(ModelSpec(other.name, "laion2b_s34b_b79k", config=other), 64)
    forged = Fingerprint(**{**json.loads(fp.to_json()), "config": twin.config})  # same name, other content
    assert not fp.same_model(twin) and not fp.same_model(forged) and fp.cache_id() != forged.cache_id()
    assert fp.matches(json.loads(fp.to_json())) and not fp.matches(json.loads(builtin.to_json()))


def test_a_recorded_config_needs_no_file(tmp_path: Path) -> None:
    path = write(tmp_path / "m.json", TINY)
    config = read_config(path)
    fp = fingerprint_for(ModelSpec(config.name, "a-tag", config=config), 64)
    path.unlink()  # moved away: the record has all of it
    spec, _ = requested_spec(Record(fp), None, None)
    assert spec.config == config and spec.name == config.name and spec.pretrained == "a-tag"
    with pytest.raises(ModelMismatch, match=r"built with m\.json \[model config sha256:"):
        requested_spec(Record(fp), str(write(tmp_path / "x.json", tiny(embed_dim=32))), None)
    with pytest.raises(ModelMismatch, match="not ViT-B-32"):
        requested_spec(Record(fp), "ViT-B-32", None)
    damaged = Fingerprint(**{**json.loads(fp.to_json()), "config_json": config.text.replace("64", "65", 1)})
    with pytest.raises(ModelUnavailable, match="damaged; pass the config file again"):
        requested_spec(Record(damaged), None, None)
    again = write(tmp_path / "again.json", json.dumps(TINY, indent=2))  # the same content repairs it
    assert requested_spec(Record(damaged), str(again), None)[0].config.sha256 == config.sha256  # type: ignore[union-attr]


# ---- refusals: one typed error, one line ---------------------------------------------------------------
BAD = [
    ("{embed_dim: 64", "is not JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"embed_dim": 64, "vision_cfg": {}, "text_cfg": {}, "x": NaN}', "not valid JSON"),
    ('{"embed_dim": 1e999, "vision_cfg": {}, "text_cfg": {}}', "not valid JSON"),
    (tiny(vision_cfg=None), "lacks vision_cfg"),
    (tiny(text_cfg=None, embed_dim=None), "lacks embed_dim, text_cfg"),
    (tiny(embed_dim="64"), 'embed_dim must be a positive integer, not "64"'),
    (tiny(embed_dim=True), "embed_dim must be a positive integer, not true"),
    (tiny(text_cfg=[1]), "text_cfg must be a JSON object"),
    (tiny(text_cfg__layers="2"), "text_cfg.layers must be a positive integer"),
    (tiny(vision_cfg__width=0), "vision_cfg.width must be a positive integer"),
    (tiny(vision_cfg__layers=[2, 2]), "vision_cfg.layers must be a positive integer (or a list of 4)"),
    (tiny(vision_cfg__image_size=[32]), "vision_cfg.image_size"),
    (tiny(vision_cfg__image_size=[32, 48]), "image_size must be square"),
    (tiny(text_cfg__mlp_ratio=-1), "text_cfg.mlp_ratio must be a positive number"),
    (tiny(text_cfg__vocab_size=32000), "vocab_size is 32000"),
    (tiny(text_cfg__hf_tokenizer_name="bert-base-uncased"), "hf_tokenizer_name makes open_clip download"),
    (tiny(text_cfg__hf_model_name="roberta-base"), "hf_model_name makes a Hugging Face text tower"),
    ({"model_cfg": TINY, "preprocess_cfg": {}}, "open_clip_config.json wrapper"),
    ("[" * 100_000 + "]" * 100_000, "nested too deep"),
    (tiny(text_cfg__tokenizer_kwargs={"bpe_path": "/x/vocab.txt.gz"}), "not bpe_path"),
    (tiny(text_cfg__tokenizer_kwargs={"context_length": 64}), "not context_length"),
    (tiny(text_cfg__tokenizer_kwargs={"clean": "upper"}), "clean must be lower, whitespace or canonicalize"),
    (tiny(text_cfg__tokenizer_kwargs={"reduction_mask": "syntax"}), "reduction_mask drops tokens"),
    (tiny(text_cfg__tokenizer_kwargs={"additional_special_tokens": ["<a>"]}), "has 49409 tokens"),
    (tiny(text_cfg__vocab_size=None, text_cfg__tokenizer_kwargs={"additional_special_tokens": ["<a>"]}),
     "vocab_size is 49408"),
    (tiny(text_cfg__tokenizer_kwargs=[]), "tokenizer_kwargs must be a JSON object"),
    ('{"embed_dim": 64, "vision_cfg": {}, "text_cfg": {"tokenizer_kwargs": null}}', "not null"),
]


@pytest.mark.parametrize("cfg,needle", BAD, ids=[n for _, n in BAD])
def test_malformed_configs_are_refused_before_open_clip(tmp_path: Path, cfg: Any, needle: str) -> None:
    path = write(tmp_path / "bad.json", cfg)
    with pytest.raises(ModelConfigError) as e:
        read_config(path)
    assert needle in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, UserError)


@pytest.mark.parametrize("cfg,needle", [
    (tiny(vision_cfg__widht=64), "vision_cfg has key(s) open_clip does not know: widht"),
    (tiny(vision_cfg__pool_type=3), "vision_cfg.pool_type must be a string, not 3"),
    (tiny(text_cfg__no_causal_mask="yes"), "text_cfg.no_causal_mask must be true or false"),
    (tiny(temperature=0.07), "key(s) open_clip's CLIP does not take: temperature"),
    (tiny(quick_gelu=1), "quick_gelu must be true or false"),
])
def test_keys_and_types_open_clip_does_not_take(tmp_path: Path, cfg: Any, needle: str) -> None:
    config = read_config(write(tmp_path / "odd.json", cfg))  # structurally fine: open_clip's own types decide
    with pytest.raises(ModelConfigError) as e:
        register(config)
    assert needle in str(e.value), str(e.value)


# ---- the CLI, end to end -------------------------------------------------------------------------------
def ok(r: Any) -> Any:
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
    return json.loads(r.stdout) if r.stdout.strip().startswith(("[", "{")) else r.stdout


def one_line(r: Any, *needles: str) -> str:
    code = r.returncode if hasattr(r, "returncode") else r.exit_code
    assert code == 2, (code, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def custom_home(tmp_path_factory: pytest.TempPathFactory, custom: tuple[Path, Path], photos  # noqa: ANN001
                ) -> tuple[Path, Path, Path]:
    """An index built by `crossmodal index --model my_clip.json --pretrained my_clip.pt` (which also exports
    the model to ONNX), then the config file moved away: (home, the file it was built with, where it went)."""
    cfg, ckpt = custom
    home = tmp_path_factory.mktemp("custom-home")
    used = shutil.copy(cfg, tmp_path_factory.mktemp("custom-config") / "my_clip.json")
    report = ok(run_cli("index", str(photos["root"]), "--model", str(used), "--pretrained", str(ckpt), "--json",
                        "--batch-size", "4", home=home))
    assert report["added"] == GOOD
    moved = used.with_name("elsewhere.json")
    used.rename(moved)  # later commands find the model from the index's record alone
    return home, used, moved


@pytest.mark.slow
@pytest.mark.subprocess
def test_index_search_caption_info_with_a_custom_config(custom_home: tuple[Path, Path, Path], custom, photos,
                                                        tmp_path: Path) -> None:
    home, used, moved = custom_home
    config = read_config(moved)
    hits = ok(run_cli("search", "red circles", "-k", "3", "--json", "--rerank", "--backend", "onnx", home=home))
    assert len(hits) == 3  # --backend onnx: the export exists and answers (reranked with its token outputs)
    info = ok(run_cli("info", "--json", home=home))
    assert info["model"] == config.name and info["dim"] == 64 and info["images"] == GOOD
    assert info["model_config"] == {"file": str(used), "sha256": config.sha256}
    assert info["onnx_export"] is not None and info["onnx_export"]["shared"] is True
    (tmp_path / "caps.txt").write_text("a red circle\na blue square\nwhite snow\n")
    ok(run_cli("add-texts", str(tmp_path / "caps.txt"), "--quiet", home=home))  # torch, from the recorded config
    caps = ok(run_cli("caption", str(photos["img01"]), "-k", "2", "--json", "--backend", "onnx", home=home))
    assert [h["corpus"] for h in caps] == ["caps", "caps"]
    # the same content under another name is the same model; other content is refused in one line
    ok(run_cli("search", "x", "-k", "1", "--model", str(moved), home=home))
    other = write(tmp_path / "my_clip.json", tiny(vision_cfg__layers=3))
    one_line(run_cli("index", str(photos["root"]), "--model", str(other), "--pretrained", str(custom[1]),
                     home=home), "built with my_clip.json [model config sha256:" + config.sha256[:12], str(other))
    one_line(run_cli("search", "x", "--model", "ViT-S-32", home=home), "built with my_clip.json", "not ViT-S-32")


@pytest.mark.slow
@pytest.mark.subprocess
def test_eval_and_train_reranker_on_the_recorded_custom_model(custom_home: tuple[Path, Path, Path], photos,
                                                               tmp_path: Path) -> None:
    home = custom_home[0]
    names = [f"img{i:02d}" for i in range(6)]
    entries = [{"filename": photos[n].name, "filepath": str(photos[n].parent), "split": s,
                "sentences": [{"raw": f"photo {n} variant {j}"} for j in range(2)]}
               for n, s in zip(names, ["train"] * 3 + ["val", "test", "test"], strict=True)]
    (tmp_path / "dataset_tiny.json").write_text(json.dumps({"images": entries}))
    doc = ok(run_cli("eval", str(tmp_path), "--split", "test", "--json", home=home))
    assert doc["images"] == 2 and "my_clip.json [model config sha256:" in doc["model"]
    dst = tmp_path / "r.safetensors"
    doc = ok(run_cli("train-reranker", str(tmp_path), "--out", str(dst), "--epochs", "1", "--json", home=home))
    from training.torch_scorer import load_params

    assert len(doc["history"]) == 1 and not load_params(dst, dim=64).identity


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_page_opens_a_custom_model_index(custom_home: tuple[Path, Path, Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    from tests.helpers import APP

    home = custom_home[0]
    monkeypatch.setenv("CROSSMODAL_HOME", str(home))
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    assert "my_clip.json [model config sha256:" in " ".join(m.value for m in at.sidebar.markdown)
    at.text_input(key="query").input("red circles").run()
    assert not at.exception and not at.error
    assert any(b.key and b.key.startswith("open-Search-") for b in at.button)


@pytest.mark.usefixtures("cli_state")
def test_cli_refusals_are_one_line(custom: tuple[Path, Path], photos, tmp_path: Path) -> None:
    cfg, ckpt = custom
    for i, (bad, needle) in enumerate([("{embed_dim: 64", "is not JSON"), (tiny(text_cfg=None), "lacks text_cfg"),
                                       (tiny(vision_cfg__patch_size="8"), "vision_cfg.patch_size"),
                                       (tiny(text_cfg__hf_tokenizer_name="x/y"), "hf_tokenizer_name"),
                                       (tiny(vision_cfg__widht=64), "does not know: widht")]):
        path = write(tmp_path / f"bad{i}.json", bad)
        line = one_line(cli_in_process("index", str(photos["img01"]), "--model", str(path), "--pretrained",
                                       str(ckpt), home=tmp_path / f"h{i}"), needle)
        assert line.startswith("crossmodal: error: model config ")
    one_line(cli_in_process("index", str(photos["img01"]), "--model", str(cfg), "--pretrained", "laion2b_s34b_b79k",
                            home=tmp_path / "tag"), "custom model config: pass its weights with --pretrained")
    one_line(cli_in_process("index", str(photos["img01"]), "--model", str(tmp_path / "nope.json"), home=tmp_path / "n"),
             f"unknown model '{tmp_path / 'nope.json'}'", "open_clip.list_models()")
    one_line(cli_in_process("add-texts", str(write(tmp_path / "t.txt", "hi\n")), "--model", "No-Such-Model",
                            home=tmp_path / "n2"), "unknown model 'No-Such-Model'")
