"""What loading a model costs, cut without changing what is loaded: no random init of weights the checkpoint
replaces, a checkpoint hashed once per user, and `--device auto` decided without torch where no GPU can be.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import TEST_MODEL


def test_a_model_built_without_random_init_equals_one_built_with_it(checkpoint: Path, encoder) -> None:  # noqa: ANN001
    """The encoder fixture is built the fast way (load_encoder); open_clip's own path, with its random
    init, gives the same weights, and torch.nn.init is itself again afterwards."""
    import open_clip
    import torch
    import torch.nn.init as init

    from retrieval.model.torch_encoder import loaded_weights_only

    before = init.normal_
    reference = open_clip.create_model(TEST_MODEL, pretrained=str(checkpoint))
    got = encoder.model.state_dict()
    want = reference.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k].float(), want[k].float()) for k in want)
    with loaded_weights_only():
        t = torch.zeros(3)
        assert init.normal_ is not before and torch.equal(init.normal_(t), torch.zeros(3))
    assert init.normal_ is before
    assert float(init.normal_(torch.zeros(1000)).abs().sum()) > 0


def test_a_checkpoint_missing_a_weight_still_fails(tmp_path: Path, checkpoint: Path) -> None:
    """Skipping the init is safe only because the load is strict: a weight the file lacks is an error, never
    uninitialised memory."""
    import torch

    from retrieval.errors import ModelUnavailable
    from retrieval.model.spec import ModelSpec
    from retrieval.model.torch_encoder import load_encoder

    sd = torch.load(checkpoint, weights_only=True)
    sd.pop(next(k for k in sd if k.endswith("proj") or "proj" in k))
    cut = tmp_path / "cut.pt"
    torch.save(sd, cut)
    with pytest.raises(ModelUnavailable, match="cannot load checkpoint"):
        load_encoder(ModelSpec(name=TEST_MODEL, pretrained=str(cut), device="cpu", precision="fp32"))


def test_a_checkpoint_is_hashed_once_per_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    import os

    import retrieval.fsutil as fsutil
    from retrieval.model.weights import file_sha256

    monkeypatch.setenv("CROSSMODAL_CACHE", str(tmp_path / "cache"))
    reads: list[str] = []
    real = fsutil.sha256_file
    monkeypatch.setattr(fsutil, "sha256_file", lambda p: (reads.append(str(p)), real(p))[1])
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"weights v1")
    want = hashlib.sha256(b"weights v1").hexdigest()
    assert file_sha256(ckpt) == want and file_sha256(ckpt) == want and len(reads) == 1
    ckpt.write_bytes(b"weights v2")  # same size, new mtime: hashed again
    os.utime(ckpt, ns=(1, 1))
    assert file_sha256(ckpt) == hashlib.sha256(b"weights v2").hexdigest() and len(reads) == 2
    (tmp_path / "cache" / "checkpoint-sha256.json").write_text("{not json")
    assert file_sha256(ckpt) == hashlib.sha256(b"weights v2").hexdigest() and len(reads) == 3  # damaged: rehash


def test_a_read_only_cache_still_hashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from retrieval.model.weights import file_sha256

    monkeypatch.setenv("CROSSMODAL_CACHE", str(tmp_path / "afile" / "cache"))
    (tmp_path / "afile").write_text("a file where the cache folder would be")
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"w")
    assert file_sha256(ckpt) == hashlib.sha256(b"w").hexdigest()


def test_auto_device_without_gpu_nodes_needs_no_torch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import retrieval.hardware as hardware
    from retrieval.model.spec import resolve_device

    if not sys.platform.startswith("linux"):
        pytest.skip("the device-node check is Linux's")
    monkeypatch.setattr(hardware, "ACCELERATOR_NODES", (str(tmp_path / "none"),))
    assert hardware.no_accelerator_possible() and resolve_device("auto") == "cpu"
    node = tmp_path / "nvidiactl"
    node.write_text("")
    monkeypatch.setattr(hardware, "ACCELERATOR_NODES", (str(node),))
    assert not hardware.no_accelerator_possible()
    import torch

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else
                                      "mps" if torch.backends.mps.is_available() else "cpu")
    probe = ("import sys; from retrieval.model.spec import resolve_device; "
             "import retrieval.hardware as h; h.ACCELERATOR_NODES = (); "
             "print(resolve_device('auto'), resolve_device('cpu'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.split() == ["cpu", "cpu", "False"]


def test_embeddings_of_the_fast_load_are_the_reference_models(checkpoint: Path, encoder) -> None:  # noqa: ANN001
    import open_clip
    import torch

    reference = open_clip.create_model(TEST_MODEL, pretrained=str(checkpoint)).eval()
    s = encoder.preprocess.size
    pixels = np.random.default_rng(0).integers(0, 256, (2, s, s, 3), dtype=np.uint8)
    got = encoder.encode_pixels(pixels)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(encoder.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(encoder.preprocess.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        want = torch.nn.functional.normalize(reference.encode_image((x - mean) / std), dim=-1).numpy()
    assert np.allclose(got, want, atol=1e-5)
