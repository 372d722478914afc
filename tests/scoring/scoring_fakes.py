"""Stand-in models for scoring tests: real classes / real file formats at tiny sizes, random weights.

* a fake insightface pack: tiny ONNX graphs with the real I/O signatures of SCRFD det_10g and ArcFace
  w600k_r50, so the real ``FaceAnalysis`` path (routing, SCRFD decode, NMS, norm_crop, ArcFace) runs.
  A "face" is a 96x96 random blocky texture with a white 32x32 marker in its centre, placed on the
  32-px grid of a 640x640 canvas; the marker fires the detector exactly once, the texture is the identity;
* tiny DINOv2 / CLIP / OWLv2 folders written with ``save_pretrained``; a tiny open_clip HPS checkpoint;
* ``make_tiny_eval_set``: a few generated/reference images, prompts and layouts, as a manifest.

Also runnable: ``python tests/scoring/scoring_fakes.py DIR`` writes all of it under DIR (used for the README example).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a stray hub id must fail at once, never download

CANVAS = 640
PATCH = 96
MARKER = 32

# fake insightface pack


def _save_onnx(graph, path: Path) -> None:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="fake-insightface")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def make_fake_detector(path: Path) -> None:
    """SCRFD det_10g signature: input.1 [1,3,?,?] -> 9 outputs (scores, boxes, kps for strides 8/16/32, 2 anchors).

    Fires where the stride-32 cell mean of the normalised input exceeds 0.5 (a bright 32-px marker).
    """
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    score_names, box_names, kps_names = ["448", "471", "494"], ["451", "474", "497"], ["454", "477", "500"]

    def const(value, name):
        return nh.from_array(np.asarray(value), name)

    inits = [
        const(np.array([-1, 1], np.int64), "shape"), const(np.array([0], np.int64), "c0"),
        const(np.array([1], np.int64), "c1"), const(np.array([1], np.int64), "ax"),
        const(np.float32(0), "zero"), const(np.float32(10), "gain"), const(np.float32(0.5), "thr"),
        const(np.float32(-10), "neg"), const(np.full((1, 4), 2.0, np.float32), "box"),
        const(np.array([[-0.6, -0.4, 0.6, -0.4, 0, 0.2, -0.5, 0.8, 0.5, 0.8]], np.float32), "kps"),
    ]
    nodes = []
    for i, stride in enumerate((8, 16, 32)):
        p = f"s{stride}_"

        def node(op, ins, outs, p=p, **kw):
            return helper.make_node(op, ins, outs, name=p + outs[0], **kw)

        nodes += [
            node("AveragePool", ["input.1"], [p + "pool"], kernel_shape=[stride, stride], strides=[stride, stride]),
            node("Slice", [p + "pool", "c0", "c1", "ax"], [p + "ch0"]),
            node("Transpose", [p + "ch0"], [p + "t"], perm=[0, 2, 3, 1]),
            node("Concat", [p + "t", p + "t"], [p + "a2"], axis=3),
            node("Reshape", [p + "a2", "shape"], [p + "flat"]),
        ]
        if stride == 32:
            nodes += [node("Sub", [p + "flat", "thr"], [p + "d"]), node("Mul", [p + "d", "gain"], [p + "logit"])]
        else:
            nodes += [node("Mul", [p + "flat", "zero"], [p + "z"]), node("Add", [p + "z", "neg"], [p + "logit"])]
        nodes += [
            node("Sigmoid", [p + "logit"], [score_names[i]]), node("Mul", [p + "flat", "zero"], [p + "zz"]),
            node("Add", [p + "zz", "box"], [box_names[i]]), node("Add", [p + "zz", "kps"], [kps_names[i]]),
        ]
    outputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, width])
        for names, width in ((score_names, 1), (box_names, 4), (kps_names, 10)) for n in names
    ]
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])
    _save_onnx(helper.make_graph(nodes, "fake_scrfd", [inp], outputs, inits), path)


def make_fake_recognizer(path: Path, seed: int = 0, nan: bool = False) -> None:
    """ArcFace signature: input.1 [N,3,112,112] -> one [N,512] output (a random projection of 8x8 means).

    ``nan=True`` writes NaN weights (a corrupt file)."""
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    weight = (np.random.default_rng(seed).standard_normal((588, 512)) / np.sqrt(588)).astype(np.float32)
    if nan:
        weight[:] = np.nan
    # node names must not start with Sub/Mul: insightface picks the input normalisation from them
    nodes = [
        helper.make_node("ReduceMean", ["input.1"], ["mu"], axes=[1, 2, 3], keepdims=1, name="mean0"),
        helper.make_node("Sub", ["input.1", "mu"], ["xc"], name="center0"),
        helper.make_node("AveragePool", ["xc"], ["pool"], kernel_shape=[8, 8], strides=[8, 8], name="pool0"),
        helper.make_node("Flatten", ["pool"], ["flat"], axis=1, name="flatten0"),
        helper.make_node("MatMul", ["flat", "proj"], ["683"], name="fc0"),
    ]
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])
    out = helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", 512])
    _save_onnx(helper.make_graph(nodes, "fake_arcface", [inp], [out], [nh.from_array(weight, "proj")]), path)


def make_fake_face_pack(root: Path, name: str = "buffalo_l") -> Path:
    """Write ``<root>/models/<name>/`` with the pack's detector and recognizer file names."""
    from multisubject.scoring.faces import KNOWN_PACKS

    pack = root / "models" / name
    pack.mkdir(parents=True, exist_ok=True)
    det, rec = KNOWN_PACKS.get(name, ("det.onnx", "rec.onnx"))
    make_fake_detector(pack / det)
    make_fake_recognizer(pack / rec)
    return pack


def face_patch(seed: int) -> np.ndarray:
    """A fake face: (96, 96, 3) uint8 blocky texture (values < 180, below the detector) + white centre marker."""
    rng = np.random.default_rng(seed)
    patch = np.kron(rng.integers(0, 180, (6, 6, 3)), np.ones((16, 16, 1))).astype(np.uint8)
    lo, hi = (PATCH - MARKER) // 2, (PATCH + MARKER) // 2
    patch[lo:hi, lo:hi] = 255
    return patch


def face_canvas(faces: list[tuple[int, int, int]], background: int = 40) -> torch.Tensor:
    """A 640x640 image with fake faces ``(seed, cell_x, cell_y)``: marker centred on 32-px grid cell (x, y).

    Shapes: returns (640, 640, 3) float RGB in [0, 1]
    """
    canvas = np.full((CANVAS, CANVAS, 3), background, np.uint8)
    for seed, cx, cy in faces:
        x0, y0 = cx * MARKER - (PATCH - MARKER) // 2, cy * MARKER - (PATCH - MARKER) // 2
        canvas[y0:y0 + PATCH, x0:x0 + PATCH] = face_patch(seed)
    return torch.from_numpy(canvas).float() / 255.0


# tiny HF models


def make_tiny_dinov2(folder: Path) -> Path:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=32, patch_size=8)
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, do_convert_rgb=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def make_tiny_dino(folder: Path) -> Path:
    """DINO v1 layout (facebook/dino-vits16): a ViTModel without pooler + ViTImageProcessor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def _tiny_clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in letters:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    merges = []
    for pair in ("t h", "th e</w>", "a n", "an d</w>", "o n</w>", "i n</w>", "c a", "ca t</w>", "d o", "do g</w>"):
        a, b = pair.split()
        merges.append((a, b))
        vocab[a + b] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.save_pretrained(folder)
    return len(vocab)


def _tiny_towers(vocab_size: int, layers: int, text_length: int, image_size: int, patch_size: int) -> dict:
    """Text and vision tower configs of a tiny CLIP-style model (width 32, 2 heads)."""
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2)
    return dict(
        text_config=dict(common, vocab_size=vocab_size, max_position_embeddings=text_length, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1),
        vision_config=dict(common, image_size=image_size, patch_size=patch_size),
    )


def make_tiny_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = _tiny_clip_tokenizer(folder)
    torch.manual_seed(0)
    config = CLIPConfig(**_tiny_towers(vocab_size, layers=2, text_length=32, image_size=32, patch_size=8),
                        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


TINY_HPS_ARCH = "multisubject-tiny-hps"
TINY_HPS_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def make_tiny_hps(path: Path) -> Path:
    """A tiny open_clip model saved like HPS_v2.1_compressed.pt ({'state_dict': ...}); arch TINY_HPS_ARCH."""
    from multisubject.scoring.metrics import register_open_clip_config

    register_open_clip_config(TINY_HPS_ARCH, TINY_HPS_CONFIG)
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(TINY_HPS_ARCH, pretrained=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, path)
    (path.parent / f"{TINY_HPS_ARCH}.json").write_text(json.dumps(TINY_HPS_CONFIG))  # for --hps-arch
    return path


def make_tiny_owlv2(folder: Path) -> Path:
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = _tiny_clip_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    # projection 32: OWL's class head maps image features to the text width
    config = Owlv2Config(**_tiny_towers(vocab_size, layers=1, text_length=16, image_size=64, patch_size=16),
                         projection_dim=32)
    Owlv2ForObjectDetection(config).save_pretrained(folder)
    processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def make_tiny_owlvit(folder: Path) -> Path:
    """OWL-ViT (v1): its processor stretches the image to a square, where OWLv2's pads it."""
    from transformers import (
        CLIPTokenizer,
        OwlViTConfig,
        OwlViTForObjectDetection,
        OwlViTImageProcessor,
        OwlViTProcessor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = _tiny_clip_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    config = OwlViTConfig(**_tiny_towers(vocab_size, layers=1, text_length=16, image_size=64, patch_size=16),
                          projection_dim=32)
    OwlViTForObjectDetection(config).save_pretrained(folder)
    image_processor = OwlViTImageProcessor(size={"height": 64, "width": 64}, crop_size={"height": 64, "width": 64})
    OwlViTProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def make_tiny_sam(folder: Path) -> Path:
    """A SAM folder (SamModel + SamProcessor) with 64-px inputs."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    torch.manual_seed(0)
    config = SamConfig(
        vision_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=64, patch_size=16, mlp_dim=64, global_attn_indexes=[0], window_size=2,
                           num_pos_feats=8),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=1, num_attention_heads=2,
                                 iou_head_hidden_dim=16),
    )
    SamModel(config).save_pretrained(folder)
    SamProcessor(SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                                   mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16})
                 ).save_pretrained(folder)
    return folder


# a tiny evaluation set


def _save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image.clamp(0, 1) * 255).round().byte().numpy()).save(path)


def make_tiny_eval_set(folder: Path, count: int = 4) -> dict[str, Path]:
    """Two "methods" over the same ``count`` prompts with 2 fake faces each; returns {run name: manifest path}.

    ``good`` places both references' identities in their boxes; ``swapped_dup`` repeats the first identity
    twice in one sample and leaves a face out in another, so its identity scores are lower.
    """
    refs_dir = folder / "references"
    samples = []
    for n in range(count):
        a, b = 100 + 2 * n, 101 + 2 * n
        for seed in (a, b):
            _save_png(face_canvas([(seed, 10, 10)]), refs_dir / f"face{seed}.png")
        samples.append((n, a, b))
    manifests = {}
    for run in ("good", "swapped_dup"):
        entries = []
        for n, a, b in samples:
            if run == "good":
                faces = [(a, 5, 10), (b, 15, 10)]
            elif n == 0:
                faces = [(a, 5, 10), (a, 15, 10)]  # one identity twice
            elif n == 1:
                faces = [(b, 15, 10)]  # first subject missing
            else:
                faces = [(b, 5, 10), (a, 15, 10)]  # swapped positions
            _save_png(face_canvas(faces), folder / run / f"{n}.png")
            entries.append({
                "id": f"s{n}",
                "image": f"{run}/{n}.png",
                "prompt": "a cat and a dog" if n % 2 else "the cat on the dog",
                "references": [{"image": f"references/face{a}.png", "label": "cat"},
                               {"image": f"references/face{b}.png", "label": "dog"}],
                "layout": {"width": CANVAS, "height": CANVAS,
                           "boxes": [[0.05, 0.2, 0.45, 0.8], [0.55, 0.2, 0.95, 0.8]]},
            })
        path = folder / f"{run}.json"
        path.write_text(json.dumps(entries, indent=1))
        manifests[run] = path
    return manifests


_BUILT: dict[str, Path] = {}


def built(name: str) -> Path:
    """Build a fake once per test session (``face_root``, ``dino``, ``dinov2``, ``clip``, ``hps``, ``owlv2``,
    ``owlvit``, ``sam``) and reuse it."""
    if name not in _BUILT:
        base = Path(tempfile.mkdtemp(prefix=f"ms-scoring-{name}-"))
        atexit.register(shutil.rmtree, base, True)
        if name == "face_root":
            make_fake_face_pack(base, "buffalo_l")
            _BUILT[name] = base
        else:
            makers = {"dino": make_tiny_dino, "dinov2": make_tiny_dinov2, "clip": make_tiny_clip,
                      "owlv2": make_tiny_owlv2, "owlvit": make_tiny_owlvit, "sam": make_tiny_sam,
                      "hps": lambda p: make_tiny_hps(p / "tiny_hps.pt")}
            _BUILT[name] = makers[name](base)
    return _BUILT[name]


def make_all(folder: Path) -> dict[str, Path]:
    """Every fake model plus the tiny set under ``folder``; returns the paths by role."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "insightface_root": folder / "insightface",
        "dino": make_tiny_dino(folder / "dino"),
        "dinov2": make_tiny_dinov2(folder / "dinov2"),
        "clip": make_tiny_clip(folder / "clip"),
        "hps": make_tiny_hps(folder / "hps" / "tiny_hps.pt"),
        "owlv2": make_tiny_owlv2(folder / "owlv2"),
    }
    make_fake_face_pack(paths["insightface_root"], "buffalo_l")
    paths.update({f"manifest_{k}": v for k, v in make_tiny_eval_set(folder / "set").items()})
    return paths


if __name__ == "__main__":
    for role, path in make_all(Path(sys.argv[1])).items():
        print(f"{role}: {path}")
