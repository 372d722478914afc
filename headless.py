"""Run ComfyUI headless with this pack and drive it through its HTTP API.

Standard library only, so it also runs as a plain script before the pack is installed
(``python3 headless.py find-comfyui`` is what the setup script uses).

Where ComfyUI is looked for, in order: ``$COMFYUI_PATH``; the ComfyUI that holds this pack
(``<ComfyUI>/custom_nodes/<pack>``); ``~/comfy/ComfyUI`` (the comfy-cli default).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent
PACK_NAME = "multisubject"
MAIN_WORKFLOW, FALLBACK_WORKFLOW = "anyms_sdxl", "layout_preview"  # `make run`: generate, else preview the layout
RUN_TIMEOUT = 6 * 3600.0  # a real generation on a slow machine

# loader inputs that name model files: node type -> {input: ComfyUI model folder}
MODEL_FILE_INPUTS = {
    "CheckpointLoaderSimple": {"ckpt_name": "checkpoints"},
    "CLIPVisionLoader": {"clip_name": "clip_vision"},
    "DualCLIPLoader": {"clip_name1": "text_encoders", "clip_name2": "text_encoders"},
    "MS_LoadMoELoRA": {"lora_name": "loras"},
    "MS_LoadIPAdapter": {"adapter_name": "ipadapter"},
    "LoraLoader": {"lora_name": "loras"},
    "UNETLoader": {"unet_name": "diffusion_models"},
    "VAELoader": {"vae_name": "vae"},
}
LEGACY_FOLDERS = {"text_encoders": ("clip",), "diffusion_models": ("unet",)}  # ComfyUI still reads these too


def comfyui_candidates() -> list[Path]:
    """Places ComfyUI is looked for, in order."""
    places = []
    if os.environ.get("COMFYUI_PATH"):
        places.append(Path(os.environ["COMFYUI_PATH"]).expanduser())
    if PACK_DIR.parent.name == "custom_nodes":
        places.append(PACK_DIR.parent.parent)
    places.append(Path.home() / "comfy" / "ComfyUI")
    return places


def find_comfyui() -> Path | None:
    """The first candidate that holds a ComfyUI checkout (its ``main.py`` and ``comfy/``), or None."""
    for place in comfyui_candidates():
        if (place / "main.py").is_file() and (place / "comfy").is_dir():
            return place.resolve()
    return None


def require_comfyui() -> Path:
    path = find_comfyui()
    if path is None:
        looked = ", ".join(str(p) for p in comfyui_candidates())
        raise RuntimeError(
            f"ComfyUI not found (looked in: {looked}). Set COMFYUI_PATH to your ComfyUI folder, or install this "
            "pack into ComfyUI/custom_nodes"
        )
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI server on loopback with this pack (and any extra packs) in a private base directory."""

    def __init__(self, comfyui: Path, base_dir: Path, extra_packs: dict[str, Path] | None = None,
                 python: str = sys.executable, models_dir: Path | None = None) -> None:
        self.comfyui = comfyui
        self.base_dir = base_dir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base_dir / "comfyui.log"
        custom_nodes = base_dir / "custom_nodes"
        custom_nodes.mkdir(parents=True, exist_ok=True)
        for name, path in {PACK_NAME: PACK_DIR, **(extra_packs or {})}.items():
            link = custom_nodes / name
            if not link.exists():
                link.symlink_to(path, target_is_directory=True)
        if models_dir is not None and models_dir.is_dir() and not (base_dir / "models").exists():
            (base_dir / "models").symlink_to(models_dir, target_is_directory=True)  # the user's real model files
        self.command = [
            python, str(comfyui / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(base_dir), "--database-url", "sqlite:///:memory:", "--disable-auto-launch",
        ]
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> ComfyServer:
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            self.command, cwd=self.comfyui, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode}; log:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s; log:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # http

    def get(self, path: str, raw: bool = False):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            body = r.read()
        return body if raw else json.loads(body)

    def post(self, path: str, payload: dict) -> tuple[int, dict]:
        """POST JSON; returns (status, body) for error statuses too (ComfyUI answers 400 with details)."""
        request = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def queue(self, prompt: dict) -> tuple[int, dict]:
        return self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Poll ``/history`` until the prompt finished (successfully or not); returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                entry["status"].get("status_str") in ("success", "error")
            ):
                return entry
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running a prompt; log:\n{self.log()[-4000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """Queue ``prompt`` and wait; raises with ComfyUI's own message if it is rejected or fails."""
        status, body = self.queue(prompt)
        if status != 200:
            raise RuntimeError(f"ComfyUI rejected the prompt (HTTP {status}): {json.dumps(body, indent=1)[:4000]}")
        entry = self.wait(body["prompt_id"], timeout)
        if entry["status"]["status_str"] != "success":
            raise RuntimeError(f"prompt failed: {error_message(entry)}")
        return entry

    def view(self, image: dict) -> bytes:
        query = urllib.parse.urlencode(
            {"filename": image["filename"], "subfolder": image.get("subfolder", ""), "type": image.get("type", "output")}
        )
        return self.get(f"/view?{query}", raw=True)


def error_message(entry: dict) -> str:
    """The exception message of a failed history entry."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_message', '').strip()}"
    return json.dumps(entry.get("status"))


@contextmanager
def running_server(extra_packs: dict[str, Path] | None = None, keep_dir: bool = False):
    """A fresh server in a temporary base directory that sees the models folder of the ComfyUI it runs."""
    comfyui = require_comfyui()
    base_dir = Path(tempfile.mkdtemp(prefix="multisubject-comfy-"))
    server = ComfyServer(comfyui, base_dir, extra_packs, models_dir=comfyui / "models")
    try:
        yield server.start()
    finally:
        server.stop()
        if not keep_dir:
            shutil.rmtree(base_dir, ignore_errors=True)


def load_api_workflow(name: str) -> dict:
    """An API-format workflow shipped in ``workflows/api/<name>.json``."""
    path = PACK_DIR / "workflows" / "api" / f"{name}.json"
    if not path.is_file():
        names = sorted(p.stem for p in (PACK_DIR / "workflows" / "api").glob("*.json"))
        raise FileNotFoundError(f"no API workflow '{name}'; shipped: {', '.join(names)}")
    return json.loads(path.read_text())


def missing_model_files(prompt: dict, models_dir: Path) -> list[tuple[str, Path]]:
    """(file name, folder it belongs in) for each model file ``prompt`` loads that ``models_dir`` lacks."""
    missing = []
    for node in prompt.values():
        for name, folder in MODEL_FILE_INPUTS.get(node["class_type"], {}).items():
            file = node["inputs"][name]
            folders = (folder, *LEGACY_FOLDERS.get(folder, ()))
            if not any((models_dir / f / file).is_file() for f in folders) and (file, models_dir / folder) not in missing:
                missing.append((file, models_dir / folder))
    return missing


def run_main_job(out_dir: Path, log=print) -> list[Path]:
    """`make run`: the AnyMS SDXL workflow when its model files are there, else the layout preview (and say why)."""
    models_dir = require_comfyui() / "models"
    missing = missing_model_files(load_api_workflow(MAIN_WORKFLOW), models_dir)
    if not missing:
        log(f"running {MAIN_WORKFLOW} (all its model files are in {models_dir})")
        return run_workflow_to_files(MAIN_WORKFLOW, out_dir)
    log(f"{MAIN_WORKFLOW} needs model files that are not there yet; put each in its folder:")
    for file, folder in missing:
        log(f"  {file}  ->  {folder}/")
    log(f"running {FALLBACK_WORKFLOW} instead (no models needed); run `make run` again once the files are in place")
    return run_workflow_to_files(FALLBACK_WORKFLOW, out_dir)


def run_workflow_to_files(name: str, out_dir: Path) -> list[Path]:
    """Run a shipped API workflow on a fresh headless server; save every output image under ``out_dir``."""
    prompt = load_api_workflow(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with running_server() as server:
        entry = server.run(prompt, timeout=RUN_TIMEOUT)
        for node_id, output in sorted(entry["outputs"].items()):
            for i, image in enumerate(output.get("images", [])):
                if image.get("type") != "output":
                    continue  # previews are temp copies of the same pixels
                path = out_dir / f"{name}_{node_id}_{i}.png"
                path.write_bytes(server.view(image))
                written.append(path)
    return written


if __name__ == "__main__":
    if sys.argv[1:] == ["find-comfyui"]:
        found = find_comfyui()
        print(found or "")
        sys.exit(0 if found else 1)
    print("usage: python3 headless.py find-comfyui", file=sys.stderr)
    sys.exit(2)
