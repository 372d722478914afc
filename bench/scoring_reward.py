"""Identity reward cost per image, by stage, measured side by side on fake models (CPU).

The fake insightface pack and the tiny DINOv2 are the test stand-ins (tests/scoring_fakes.py), so the
absolute times say nothing about real packs; the ratios show where the reward's time goes and what
embedding the references once (``embed_references``) saves compared with re-embedding them per call.

    PYTHONPATH=<parent of the pack> python bench/scoring_reward.py [--device cpu|cuda] [--quick] [--batch 8] [--repeat 3]

The models are fakes, so ``--real-dims`` changes nothing; ``--device cuda`` moves the object model only (the fake
face pack runs on onnxruntime's CPU provider). The figures have no targets: they say where the time goes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import harness
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from scoring_fakes import face_canvas, make_fake_face_pack, make_tiny_dinov2  # noqa: E402

from multisubject.attention.layout import Layout  # noqa: E402
from multisubject.attention.subjects import Subject, Subjects  # noqa: E402
from multisubject.scoring import IdentityScorer, match_identities  # noqa: E402

TARGETS = {"uncached_over_cached": None, "hungarian_over_cached": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=None, help="default 8, 4 with --quick")
    parser.add_argument("--repeat", type=int, default=None, help="default 3, 1 with --quick")
    harness.add_suite_args(parser, "accepted; the models are fakes, there are no real dims")
    args = parser.parse_args()
    device = harness.device_from(args)
    args.batch = args.batch or (4 if args.quick else 8)
    args.repeat = args.repeat or (1 if args.quick else 3)
    torch.set_num_threads(1)  # comparable numbers on a shared machine

    def best(fn, repeat: int) -> float:
        return min(harness.timed(fn, device) for _ in range(repeat))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_fake_face_pack(root / "insightface", "buffalo_l")
        scorer = IdentityScorer.from_paths(face_pack="buffalo_l", insightface_roots=[str(root / "insightface")],
                                           object_model=str(make_tiny_dinov2(root / "dinov2")),
                                           device=device.type)
        dark = torch.rand(96, 96, 3) * 0.6  # below the fake detector: an object, not a face
        subjects = Subjects((Subject(images=face_canvas([(1, 10, 10)])[None], label="person a"),
                             Subject(images=face_canvas([(2, 10, 10)])[None], label="person b"),
                             Subject(images=dark[None], label="vase")))
        image = face_canvas([(1, 4, 6), (2, 15, 6)])
        image[480:576, 272:368] = dark
        images = image[None].repeat(args.batch, 1, 1, 1)
        layout = Layout.from_boxes(640, 640, [(0.0, 0.05, 0.45, 0.45), (0.55, 0.05, 1.0, 0.45),
                                              (272 / 640, 480 / 640, 368 / 640, 576 / 640)])
        refs = scorer.embed_references(subjects)
        assert refs.kinds == ("face", "face", "object")
        batch = args.batch
        stages = {
            "reward, references embedded once": best(lambda: scorer(images, refs, layout), args.repeat) / batch,
            "reward, references re-embedded per call": best(lambda: scorer(images, subjects, layout), args.repeat)
            / batch,
            "face detection + ArcFace (1 image)": best(lambda: scorer.faces.detect(image), args.repeat),
            "object crops + DINOv2 (1 image)": best(
                lambda: scorer.objects.embed_images([image[480:576, 272:368]]), args.repeat),
            "Hungarian 7x7 (1 problem)": best(lambda: match_identities(torch.rand(7, 7)), args.repeat * 20),
        }
    base = stages["reward, references embedded once"]
    print(f"identity reward on fake models ({device.type}), batch {batch}, 640x640, 2 faces + 1 object, best of {args.repeat}")
    print(f"{'stage':<42} {'ms / image':>11} {'x cached reward':>16}")
    for name, seconds in stages.items():
        print(f"{name:<42} {seconds * 1e3:>11.3f} {seconds / base:>16.3f}")
    print(json.dumps({"batch": batch, **{k: round(v * 1e3, 4) for k, v in stages.items()},
                      "uncached_over_cached": round(stages["reward, references re-embedded per call"] / base, 3),
                      "hungarian_over_cached": round(stages["Hungarian 7x7 (1 problem)"] / base, 5)}))


if __name__ == "__main__":
    main()
