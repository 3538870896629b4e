"""`export --formats onnx` and `predict --backend onnxruntime`: graph contract, parity with PyTorch
within the stated tolerance (random and real-geometry input), dynamic batch, same labels as the
torch backend, and a clear message when the optional packages are missing."""

from __future__ import annotations

import dataclasses
import json
import stat
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from export_fixtures import ellipsoid_phantom, oblique_lps_affine, write_source

from stunet_scale.cli import main
from stunet_scale.export import export
from stunet_scale.export.checkpoint_io import CheckpointError, read_weights
from stunet_scale.export.onnx_model import (
    INSTALL_HINT,
    ONNX_OPSET,
    ONNX_RELPATH,
    PARITY_RTOL,
    OnnxRuntimeNetwork,
    OnnxUnavailableError,
    read_spec,
    real_geometry_patch,
    verify_onnx,
)
from stunet_scale.models import STUNet

NOT_INSTALLED = "the onnx extra is not installed: pip install 'stunet-scale[onnx]'"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny STU-Net exported as safetensors (the torch backend's input) and ONNX, from one source.
    Tests that need it skip without the optional packages; the missing-package test runs anyway."""
    pytest.importorskip("onnx", reason=NOT_INSTALLED)
    pytest.importorskip("onnxruntime", reason=NOT_INSTALLED)
    root = tmp_path_factory.mktemp("onnx")
    source, _, _ = write_source(root / "ckpt.pth")
    lines = []
    export(source, root / "export", formats=["safetensors", "onnx"], log=lines.append)
    return root / "export", lines


def _torch_network(export_dir):
    """The exported weights as a PyTorch module without deep supervision (what the ONNX graph holds)."""
    weights = read_weights(export_dir)
    model = STUNet(dataclasses.replace(weights.spec.model_config, deep_supervision=False))
    model.load_state_dict(weights.state_dict, strict=True)
    return model.eval(), weights.spec


def _dims(value_info) -> list:
    """An ONNX input/output's shape: symbolic names for dynamic axes, sizes for fixed ones."""
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _max_diff_and_allowed(onnx_out, torch_out):
    return float((onnx_out - torch_out).abs().max()), PARITY_RTOL * max(1.0, float(torch_out.abs().max()))


def test_onnx_file_contract(exported):
    import onnx

    out, lines = exported
    path = out / ONNX_RELPATH
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable by the deployment side, not 0600
    sums = dict(reversed(line.split("  ")) for line in (out / "SHA256SUMS").read_text().splitlines())
    assert str(ONNX_RELPATH) in sums
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [ONNX_OPSET]
    # One input, one output: the full-resolution logits only, no deep-supervision heads.
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits"]
    spec = read_spec(path)
    assert _dims(model.graph.input[0]) == ["batch", spec.in_channels, *spec.patch_size]
    assert _dims(model.graph.output[0]) == ["batch", spec.num_classes, *spec.patch_size]
    # The spec inside the file is the one of the weights beside it (axis order, spacing, labels).
    assert spec.to_dict() == read_weights(out).spec.to_dict()
    assert any("verified model.onnx: onnxruntime CPU vs PyTorch" in line for line in lines)
    # the check's numbers are recorded with the export
    check = json.loads((out / "hf" / "config.json").read_text())["export"]["onnx"]
    assert check["opset"] == ONNX_OPSET and 0 <= check["max_abs_diff"] <= check["allowed_abs_diff"]


def test_parity_random_and_real_geometry_and_dynamic_batch(exported):
    out, _ = exported
    model, spec = _torch_network(out)
    session = OnnxRuntimeNetwork(out / ONNX_RELPATH)
    generator = torch.Generator().manual_seed(3)
    real = torch.from_numpy(real_geometry_patch(spec, seed=5))
    # The real-geometry patch is a normalised CT (air, fat, organs), not noise: neighbouring voxels
    # are strongly correlated (noise: ~0) and the z-score range spans tissue contrast.
    neighbours = torch.corrcoef(torch.stack([real[0, :-1].flatten(), real[0, 1:].flatten()]))[0, 1]
    assert neighbours > 0.5 and real.max() - real.min() > 2
    inputs = {
        "random, batch 1": torch.randn((1, spec.in_channels, *spec.patch_size), generator=generator),
        "random, batch 5": torch.randn((5, spec.in_channels, *spec.patch_size), generator=generator),
        "real geometry, batch 2": torch.stack([real, torch.flip(real, [1])]),
    }
    for what, x in inputs.items():
        with torch.no_grad():
            expected = model(x)
        got = session(x)
        assert got.shape == expected.shape, what
        diff, allowed = _max_diff_and_allowed(got, expected)
        assert diff <= allowed, f"{what}: {diff} > {allowed}"
        assert diff < allowed / 10, f"{what}: {diff} is close to the tolerance; rounding alone should be far below"
        # batch entries are independent: entry 0 of a batch equals the same patch alone
        alone = session(x[:1])
        assert float((alone - got[:1]).abs().max()) <= allowed, what


def test_export_check_fails_on_a_wrong_network(exported, tmp_path):
    # The tolerance is tight enough to matter: the file checked against slightly different weights
    # (one class's head bias off by 0.05, under 1% of the logits' range) must fail the export check.
    # (A bias in front of an instance norm would not do: the norm subtracts it again.)
    out, _ = exported
    model, spec = _torch_network(out)
    with torch.no_grad():
        model.seg_outputs[-1].bias[1] += 0.05
    with pytest.raises(CheckpointError, match="ONNX export check failed"):
        verify_onnx(model, out / ONNX_RELPATH, spec)


def test_predict_onnxruntime_gives_the_torch_labels(exported, tmp_path, capsys):
    out, _ = exported
    affine = oblique_lps_affine(spacing=(1.6, 1.8, 2.5))
    (tmp_path / "in").mkdir()
    image, _ = ellipsoid_phantom((40, 36, 22), affine, (18, 16, 10), (18, 12, 16))
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "in" / "case_0000.nii.gz"))
    common = ["--device", "cpu", "--mirror", "--batch-size", "3", "--step-size", "0.5"]
    assert main(["predict", str(out), str(tmp_path / "in"), str(tmp_path / "torch"), *common]) == 0
    assert main(["predict", str(out), str(tmp_path / "in"), str(tmp_path / "ort"), "--backend", "onnxruntime",
                 *common]) == 0
    assert "onnxruntime CPUExecutionProvider" in capsys.readouterr().out
    seg_torch = nib.load(str(tmp_path / "torch" / "case.nii.gz"))
    seg_ort = nib.load(str(tmp_path / "ort" / "case.nii.gz"))
    a, b = np.asarray(seg_torch.dataobj), np.asarray(seg_ort.dataobj)
    assert len(np.unique(a)) >= 3  # the whitened tiny model predicts several classes, not one constant map
    # The logits agree to rounding, so labels may differ only where the torch logits nearly tie:
    # resampling back is a convex combination, so a flip needs a top-2 margin <= 2 x max|logit diff|.
    margin, max_diff = _torch_margin_and_backend_diff(out, tmp_path / "in" / "case_0000.nii.gz", batch_size=3)
    differ = a != b
    assert differ.mean() <= 1e-3, f"{differ.sum()} of {differ.size} voxels differ"
    assert np.all(margin[differ] <= 2 * max_diff), (margin[differ], max_diff)
    assert np.array_equal(seg_torch.affine, seg_ort.affine)
    assert json.loads((tmp_path / "ort" / "labels.json").read_text())["labels"] == \
        json.loads((tmp_path / "torch" / "labels.json").read_text())["labels"]
    # the .onnx file alone works as well (its spec travels inside it)
    assert main(["predict", str(out / ONNX_RELPATH), str(tmp_path / "in"), str(tmp_path / "ort_file"),
                 "--backend", "onnxruntime", "--device", "cpu"]) == 0


def _torch_margin_and_backend_diff(export_dir, nifti, batch_size):
    """(top-2 logit margin of the torch backend on the file's grid, max |logit diff| torch vs onnxruntime
    on the network grid), through predict's own steps (same preprocessing, window, mirroring)."""
    from stunet_scale.predict import (
        Runtime,
        _resample_logits,
        network_logits,
        read_case,
        restore_labels,
    )

    model, spec = _torch_network(export_dir)
    image, affine, _ = read_case([nifti])
    rt = Runtime(device=torch.device("cpu"), autocast_dtype=None, mirror_axes=tuple(spec.mirror_axes),
                 batch_size=batch_size, progress=False)
    logits_torch, _, geometry = network_logits(model, spec, image, affine, rt)
    logits_ort, _, _ = network_logits(OnnxRuntimeNetwork(export_dir / ONNX_RELPATH), spec, image, affine, rt)
    max_diff, allowed = _max_diff_and_allowed(logits_ort, logits_torch)
    assert max_diff <= allowed
    if spec.axis_order == "ras_zyx":
        logits_torch = logits_torch.permute(0, 3, 2, 1)
    top2 = _resample_logits(logits_torch, geometry.cropped_shape, geometry.separate_axis).topk(2, 0).values
    return restore_labels((top2[0] - top2[1]).numpy(), geometry), max_diff


def test_predict_onnxruntime_errors_name_the_fix(exported, tmp_path, capsys):
    out, _ = exported
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(tmp_path / "ct.nii.gz"))
    source, _, _ = write_source(tmp_path / "ckpt.pth")
    assert main(["predict", str(source), str(tmp_path / "ct.nii.gz"), str(tmp_path / "o.nii.gz"),
                 "--backend", "onnxruntime"]) == 1
    assert "--formats onnx" in capsys.readouterr().err
    assert main(["predict", str(out), str(tmp_path / "ct.nii.gz"), str(tmp_path / "o.nii.gz"),
                 "--backend", "onnxruntime", "--precision", "bf16"]) == 1
    assert "fp32" in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_missing_package_names_the_pip_install(tmp_path, monkeypatch, capsys, missing):
    source, _, _ = write_source(tmp_path / "ckpt.pth")
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    with pytest.raises(OnnxUnavailableError, match=r"pip install 'stunet-scale\[onnx\]'"):
        export(source, tmp_path / "export", formats=["onnx"], log=lambda *a: None)
    assert not (tmp_path / "export").exists() and not list(tmp_path.glob("export.partial-*"))
    assert main(["export", str(source), str(tmp_path / "cli_export"), "--formats", "onnx"]) == 1
    err = capsys.readouterr().err
    assert INSTALL_HINT in err and repr(missing) in err
    # predict says the same, before touching the model file
    (tmp_path / "m.onnx").write_bytes(b"not read")
    assert main(["predict", str(tmp_path / "m.onnx"), str(tmp_path / "in"), str(tmp_path / "o"),
                 "--backend", "onnxruntime", "--device", "cpu"]) == 1
    assert INSTALL_HINT in capsys.readouterr().err
    # the default formats do not need the ONNX packages
    export(source, tmp_path / "default_export", log=lambda *a: None)
    assert not (tmp_path / "default_export" / "onnx").exists()
