"""`make run`'s choice: which model files the AnyMS SDXL workflow still needs, and in which folder each goes."""

from multisubject.headless import MAIN_WORKFLOW, load_api_workflow, missing_model_files


def test_missing_model_files_name_each_file_and_its_folder(tmp_path):
    prompt = load_api_workflow(MAIN_WORKFLOW)
    missing = missing_model_files(prompt, tmp_path)
    assert missing == [
        ("sd_xl_base_1.0.safetensors", tmp_path / "checkpoints"),
        ("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", tmp_path / "clip_vision"),
        ("ip-adapter-plus_sdxl_vit-h.safetensors", tmp_path / "ipadapter"),
    ]
    for file, folder in missing:
        folder.mkdir(parents=True)
        (folder / file).write_bytes(b"")
    assert missing_model_files(prompt, tmp_path) == []


def test_legacy_folders_count(tmp_path):
    prompt = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux.safetensors"}}}
    assert missing_model_files(prompt, tmp_path) == [("flux.safetensors", tmp_path / "diffusion_models")]
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "flux.safetensors").write_bytes(b"")
    assert missing_model_files(prompt, tmp_path) == []
