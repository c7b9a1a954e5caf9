"""The model-file catalogue: finding files the way ComfyUI users lay them out, and telling them
exactly what is missing and where it goes."""
from __future__ import annotations

import os
from pathlib import Path


from dreamidv_core.weights import model_files as mf
from dreamidv_core.weights.model_files import CATALOGUE, find_model_files, format_missing, markdown_table

REQUIRED_KEYS = {"dit", "vae", "text_encoder"}


def touch(path: Path, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    return path


def make_swap_set(models: Path) -> None:
    touch(models / "diffusion_models" / "dreamidv.safetensors")
    touch(models / "vae" / "wan_2.1_vae.safetensors")
    touch(models / "text_encoders" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")


def test_catalogue_is_consistent():
    keys = [m.key for m in CATALOGUE]
    assert len(keys) == len(set(keys))
    assert REQUIRED_KEYS == {m.key for m in CATALOGUE if m.required}
    for m in CATALOGUE:
        assert m.options and all(m.options), m.key
        assert m.what and m.source and m.required_for, m.key
        assert not (m.required and m.coming), m.key
        assert "/" not in m.folder and m.folder == m.folder.strip()
    # the files named in the spec are all accepted somewhere
    names = {p for m in CATALOGUE for opt in m.options for p in opt}
    for n in ["dreamidv.pth", "dreamidv_faster.pth", "wan_2.1_vae.safetensors", "Wan2.1_VAE.pth",
              "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "umt5_xxl_fp16.safetensors",
              "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/",
              "face_landmarker_v2_with_blendshapes.task", "models/antelopev2/", "models/buffalo_l/",
              "yolox_l.onnx", "dw-ll_ucoco_384.onnx"]:
        assert n in names, n


def test_empty_dir_reports_every_required_file_with_its_folder(tmp_path):
    report = find_model_files(tmp_path)
    assert not report.ok
    assert {st.entry.key for st in report.missing(include_optional=False)} == REQUIRED_KEYS
    msg = format_missing(report)
    assert f"missing: put one of wan_2.1_vae.safetensors, Wan2.1_VAE.pth in {tmp_path / 'vae'}{os.sep}" in msg
    assert f"{tmp_path / 'diffusion_models'}{os.sep}" in msg and "dreamidv.pth" in msg
    assert "umt5_xxl_fp8_e4m3fn_scaled.safetensors" in msg
    assert "models_t5_umt5-xxl-enc-bf16.pth + google/umt5-xxl/" in msg
    # optional files are listed apart, with what they are needed for
    required_part, optional_part = msg.split("Optional files", 1)
    assert "dreamidv_faster" not in required_part and "dreamidv_faster" in optional_part
    assert "yolox_l.onnx" in optional_part and "pose and mask from video (DWPose)" in optional_part


def test_complete_swap_set_is_found(tmp_path):
    make_swap_set(tmp_path)
    report = find_model_files(tmp_path)
    assert report.ok
    assert report.ready_for(mf.SWAP)
    assert not report.ready_for(mf.FASTER_SWAP)
    assert report.path("dit") == tmp_path / "diffusion_models" / "dreamidv.safetensors"
    assert report.path("vae") == tmp_path / "vae" / "wan_2.1_vae.safetensors"
    msg = format_missing(report)
    assert "All model files needed to swap faces were found" in msg
    assert "missing: put one of dreamidv.safetensors" not in msg


def test_only_vae_missing_names_only_the_vae(tmp_path):
    make_swap_set(tmp_path)
    (tmp_path / "vae" / "wan_2.1_vae.safetensors").unlink()
    report = find_model_files(tmp_path)
    assert [st.entry.key for st in report.missing(include_optional=False)] == ["vae"]
    assert [st.entry.key for st in report.missing(mf.SWAP)] == ["vae"]
    msg = format_missing(report, include_optional=False)
    assert msg.count("missing:") == 1 and "Optional files" not in msg


def test_pth_accepted_and_first_option_wins(tmp_path):
    touch(tmp_path / "vae" / "Wan2.1_VAE.pth")
    assert find_model_files(tmp_path).path("vae").name == "Wan2.1_VAE.pth"
    touch(tmp_path / "vae" / "wan_2.1_vae.safetensors")
    assert find_model_files(tmp_path).path("vae").name == "wan_2.1_vae.safetensors"


def test_files_in_subfolders_and_legacy_folder_names(tmp_path):
    touch(tmp_path / "unet" / "wan" / "dreamidv.pth")
    touch(tmp_path / "clip" / "umt5_xxl_fp16.safetensors")
    touch(tmp_path / "vae" / "video" / "wan_2.1_vae.safetensors")
    report = find_model_files(tmp_path)
    assert report.ok, format_missing(report)
    assert report.path("dit") == tmp_path / "unet" / "wan" / "dreamidv.pth"
    assert report.path("text_encoder") == tmp_path / "clip" / "umt5_xxl_fp16.safetensors"


def test_too_deep_files_are_not_found(tmp_path):
    touch(tmp_path / "vae" / "a" / "b" / "c" / "d" / "wan_2.1_vae.safetensors")
    assert not find_model_files(tmp_path)["vae"].ok


def test_official_text_encoder_needs_the_tokenizer_folder(tmp_path):
    te = tmp_path / "text_encoders"
    touch(te / "models_t5_umt5-xxl-enc-bf16.pth")
    assert not find_model_files(tmp_path)["text_encoder"].ok
    (te / "google" / "umt5-xxl").mkdir(parents=True)
    assert not find_model_files(tmp_path)["text_encoder"].ok, "an empty tokenizer folder must not count"
    touch(te / "google" / "umt5-xxl" / "spiece.model")
    st = find_model_files(tmp_path)["text_encoder"]
    assert st.ok
    assert st.found == (te / "models_t5_umt5-xxl-enc-bf16.pth", te / "google" / "umt5-xxl")


def test_empty_file_and_directory_with_a_model_name_do_not_count(tmp_path):
    touch(tmp_path / "vae" / "wan_2.1_vae.safetensors", size=0)
    (tmp_path / "diffusion_models" / "dreamidv.pth").mkdir(parents=True)
    report = find_model_files(tmp_path)
    assert not report["vae"].ok and not report["dit"].ok


def test_insightface_pack_needs_onnx_files(tmp_path):
    pack = tmp_path / "insightface" / "models" / "antelopev2"
    touch(pack / "readme.txt")
    assert not find_model_files(tmp_path)["insightface"].ok
    touch(pack / "glintr100.onnx")
    assert find_model_files(tmp_path).path("insightface") == pack


def test_extra_roots_and_per_folder_dirs(tmp_path):
    main, extra, vae_dir = tmp_path / "main", tmp_path / "extra", tmp_path / "elsewhere" / "vaes"
    main.mkdir()
    touch(extra / "diffusion_models" / "dreamidv.pth")
    touch(vae_dir / "Wan2.1_VAE.pth")
    touch(extra / "text_encoders" / "umt5_xxl_fp16.safetensors")
    assert not find_model_files(main).ok
    report = find_model_files(main, extra_dirs=[extra])
    assert report["dit"].ok and not report["vae"].ok
    report = find_model_files(main, extra_dirs={"vae": [vae_dir], "diffusion_models": str(extra / "diffusion_models"),
                                                "clip": [extra / "text_encoders"]})
    assert report.ok, format_missing(report)
    # missing files are still to be put in the main models dir
    assert find_model_files(main)["vae"].target_dir == main / "vae"


def test_main_models_dir_has_priority_over_extra_dirs(tmp_path):
    main, extra = tmp_path / "main", tmp_path / "extra"
    touch(main / "vae" / "Wan2.1_VAE.pth")
    touch(extra / "vae" / "Wan2.1_VAE.pth")
    assert find_model_files(main, extra_dirs=extra).path("vae") == main / "vae" / "Wan2.1_VAE.pth"


def test_dwpose_needs_both_files_separately(tmp_path):
    touch(tmp_path / "dwpose" / "yolox_l.onnx")
    report = find_model_files(tmp_path)
    assert report["dwpose_detector"].ok and not report["dwpose_estimator"].ok
    assert not report.ready_for(mf.POSE_DWPOSE)
    touch(tmp_path / "dwpose" / "dw-ll_ucoco_384.onnx")
    assert find_model_files(tmp_path).ready_for(mf.POSE_DWPOSE)


def test_command_line_check(tmp_path, capsys):
    assert mf.main(["--models-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'vae'}{os.sep}" in out
    assert mf.main(["--models-dir", str(tmp_path), "--strict"]) == 1
    make_swap_set(tmp_path)
    assert mf.main(["--models-dir", str(tmp_path), "--strict"]) == 0


def test_readme_table_is_generated_from_the_catalogue(repo_root):
    table = markdown_table()
    for m in CATALOGUE:
        assert f"`{m.folder}/`" in table
    readme = (repo_root / "README.md").read_text(encoding="utf-8")
    assert table in readme, ("README.md's model table differs from the catalogue: paste the output of "
                             "`python -m dreamidv_core.weights.model_files --markdown`")


def test_module_does_not_import_torch_or_comfyui():
    src = Path(mf.__file__).read_text(encoding="utf-8")
    for banned in ("import torch", "import comfy", "import folder_paths"):
        assert banned not in src
