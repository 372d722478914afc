"""The evaluation CLI end to end on a tiny generated set, the layout metrics, and optional-dependency errors."""

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("insightface", reason="needs the eval extra: pip install -e '.[eval]'")
pytest.importorskip("open_clip", reason="needs the eval extra (open_clip_torch)")
pytest.importorskip("matplotlib", reason="needs the eval extra")

from PIL import Image  # noqa: E402
from scoring_fakes import TINY_HPS_ARCH, built, make_tiny_eval_set  # noqa: E402

from multisubject.__main__ import main  # noqa: E402
from multisubject.scoring.evaluate import METRICS, OVERALL_OF  # noqa: E402
from multisubject.scoring.metrics import average_precision_50, layout_ious, pad_to_square_resize  # noqa: E402


def _model_args():
    hps = built("hps")
    return ["--insightface-root", str(built("face_root")), "--face-pack", "buffalo_l",
            "--dino-dir", str(built("dino")), "--clip-dir", str(built("clip")),
            "--hps-checkpoint", str(hps), "--hps-arch", str(hps.parent / f"{TINY_HPS_ARCH}.json"),
            "--detector-dir", str(built("owlv2")), "--no-progress"]


def _parse_table(text):
    lines = [line.strip("|").split("|") for line in text.strip().splitlines()]
    header = [c.strip() for c in lines[0]]
    return {row[0].strip(): dict(zip(header[1:], (c.strip() for c in row[1:]))) for row in lines[2:]}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_set")
    manifests = make_tiny_eval_set(folder, count=2)
    broken = json.loads(manifests["swapped_dup"].read_text())
    broken.append({"id": "gone", "image": "swapped_dup/missing.png", "prompt": "x",
                   "references": broken[0]["references"]})
    manifests["swapped_dup"].write_text(json.dumps(broken))
    out = folder / "out"
    logged = []
    import multisubject.scoring.cli as cli

    args = [f"good={manifests['good']}", f"swapped_dup={manifests['swapped_dup']}", "--out", str(out)]
    parser_args = args + _model_args()
    rc = cli.run_eval(_parse(parser_args), log=logged.append)
    return out, rc, logged


def _parse(argv):
    import argparse

    from multisubject.scoring.cli import add_eval_parser

    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", *argv])


def test_cli_writes_per_sample_files_table_and_plots(evaluated):
    out, rc, _ = evaluated
    assert rc == 0
    for name in ("per_sample.json", "per_sample.csv", "table.md", "summary.json"):
        assert (out / name).stat().st_size > 0
    for plot in ("metrics.png", "worst_samples.png"):
        with Image.open(out / "plots" / plot) as im:
            assert im.width > 300 and im.height > 200
    table = _parse_table((out / "table.md").read_text())
    assert set(table) == {"good", "swapped_dup"}
    assert set(table["good"]) == set(METRICS) | {"n", "failed"}
    assert table["good"]["Face-Sim"] == "1.0000" and float(table["swapped_dup"]["Face-Sim"]) < 0.9
    rows = json.loads((out / "per_sample.json").read_text())
    assert len(rows) == 5 and {r["run"] for r in rows} == {"good", "swapped_dup"}
    header = (out / "per_sample.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["run", "index", "id", "image"] and "Face-Sim" in header


def test_table_overall_is_the_mean_of_its_five_columns(evaluated):
    out, _, _ = evaluated
    summary = json.loads((out / "summary.json").read_text())
    table = _parse_table((out / "table.md").read_text())
    for run, values in summary["runs"].items():
        assert values["Overall"] == pytest.approx(sum(values[m] for m in OVERALL_OF) / 5, abs=1e-12)
        shown = [float(table[run][m]) for m in OVERALL_OF]
        assert float(table[run]["Overall"]) == pytest.approx(sum(shown) / 5, abs=1.5e-4)


def test_missing_file_entry_is_reported_counted_and_the_rest_evaluated(evaluated):
    out, _, logged = evaluated
    table = _parse_table((out / "table.md").read_text())
    assert table["swapped_dup"]["n"] == "2" and table["swapped_dup"]["failed"] == "1"
    assert table["good"]["failed"] == "0"
    assert any("swapped_dup entry 2 (id gone)" in line and "missing.png does not exist" in line for line in logged)
    rows = {(r["run"], r["id"]): r for r in json.loads((out / "per_sample.json").read_text())}
    assert "does not exist" in rows[("swapped_dup", "gone")]["error"]
    assert rows[("swapped_dup", "s1")]["per_subject_identity"] == pytest.approx([0.0, 1.0], abs=1e-4)


def test_help_lists_every_metric_with_its_definition(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, definition in METRICS.items():
        assert f"{name} [" in text and " ".join(definition.split()[:6]) in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "run-workflow" in capsys.readouterr().out  # the other command is still there


def test_cli_gives_one_clear_line_for_a_hub_id(capsys, tmp_path):
    manifest = tmp_path / "m.json"
    manifest.write_text("[]")
    assert main(["eval", str(manifest), "--dino-dir", "facebook/dino-vits16", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "looks like a model-hub id" in err[0]


def test_miou_and_ap50_on_known_detections():
    targets = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0]])
    exact = (torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([0.9]))
    half = (torch.tensor([[20.0, 0.0, 25.0, 10.0], [0.0, 0.0, 1.0, 1.0]]), torch.tensor([0.8, 0.3]))
    assert layout_ious([exact, half], targets).tolist() == pytest.approx([1.0, 0.5])
    assert layout_ious([exact, (torch.zeros(0, 4), torch.zeros(0))], targets).tolist() == [1.0, 0.0]
    # ranked: 0.9 TP, 0.8 TP (IoU 0.5), 0.3 FP -> precision 1 up to recall 1: AP 1
    assert average_precision_50([([exact, half], targets)]) == pytest.approx(1.0)
    # a high-scoring miss first: ranked FP, TP -> recall 0.5 at precision 0.5 (second target never found)
    miss = (torch.tensor([[5.0, 5.0, 9.0, 9.0], [0.0, 0.0, 10.0, 10.0]]), torch.tensor([0.9, 0.5]))
    assert average_precision_50([([miss, (torch.zeros(0, 4), torch.zeros(0))], targets)]) == pytest.approx(0.25)


def test_hps_preprocessing_resizes_the_longest_side_and_pads_to_square():
    image = torch.ones(50, 100, 3)
    x = pad_to_square_resize(image, 32)
    assert x.shape == (3, 32, 32)
    white = (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    assert torch.allclose(x[:, 16, :], white[:, None].expand(3, 32), atol=1e-4)  # content row
    assert torch.allclose(x[:, 0, 0], -torch.tensor([0.48145466, 0.4578275, 0.40821073]) /
                          torch.tensor([0.26862954, 0.26130258, 0.27577711]), atol=1e-4)  # padding is 0 before norm


BLOCK_OPTIONAL = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {"insightface", "onnxruntime", "onnx", "open_clip", "matplotlib", "tqdm", "transformers", "cv2"}:
            raise ImportError(f"No module named {name!r} (blocked)")
sys.meta_path.insert(0, Block())
"""


def test_optional_packages_are_needed_only_when_used():
    code = BLOCK_OPTIONAL + """
import torch
import multisubject.scoring as s
from multisubject.__main__ import main
import multisubject.scoring.cli, multisubject.scoring.evaluate, multisubject.scoring.metrics
import multisubject.scoring.plots, multisubject.scoring.report
print(s.match_identities(torch.tensor([[0.5]])).score)
from multisubject.scoring.objects import ImageEmbedder
try:
    ImageEmbedder.load(sys.argv[1])
except RuntimeError as e:
    print(e)
"""
    done = subprocess.run([sys.executable, "-c", code, str(built("dinov2"))], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "0.5"
    assert len(lines) == 2 and "needs the optional package transformers" in lines[1]
    assert "pip install 'multisubject[eval]'" in lines[1]


def test_face_sim_works_without_an_object_model_and_multi_id_is_then_na(tmp_path):
    from scoring_fakes import face_canvas

    from multisubject.attention.subjects import Subject, Subjects
    from multisubject.scoring.evaluate import Evaluator, Sample
    from multisubject.scoring.faces import FaceEmbedder

    generated = tmp_path / "gen.png"
    Image.fromarray((face_canvas([(5, 4, 10)]).numpy() * 255).astype("uint8")).save(generated)
    subjects = Subjects((Subject(images=face_canvas([(5, 10, 10)])[None], label="person"),
                         Subject(images=torch.full((1, 64, 64, 3), 0.3), label="vase")))
    evaluator = Evaluator(faces=FaceEmbedder.load("buffalo_l", roots=[built("face_root")]))
    result = evaluator.evaluate(Sample(0, "s", generated, "a person and a vase", subjects, None), "run")
    assert result.metrics["Face-Sim"] == pytest.approx(1.0, abs=1e-4)
    assert result.metrics["Multi-ID"] is None and result.metrics["Overall"] is None
    assert result.identity.kinds == ("face", "none")


def test_hps_score_is_the_cosine_of_open_clip_features_and_bad_files_are_named(tmp_path):
    import open_clip
    import torch.nn.functional as F

    from multisubject.scoring.metrics import HPSv2Scorer

    hps_file = built("hps")
    scorer = HPSv2Scorer.load(hps_file, str(hps_file.parent / f"{TINY_HPS_ARCH}.json"), device="cpu")
    image = torch.rand(40, 56, 3)
    score = scorer([image], ["a cat"])
    with torch.no_grad():
        img = F.normalize(scorer.model.encode_image(pad_to_square_resize(image, 32)[None]), dim=-1)
        txt = F.normalize(scorer.model.encode_text(open_clip.get_tokenizer(TINY_HPS_ARCH)(["a cat"])), dim=-1)
    assert score.tolist() == pytest.approx([(img * txt).sum().item()], abs=1e-5)
    with pytest.raises(FileNotFoundError, match="expected the file HPS_v2.1_compressed.pt"):
        HPSv2Scorer.load(tmp_path / "HPS_v2.1_compressed.pt", TINY_HPS_ARCH)
    torch.save({"state_dict": {"nothing": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not fit open_clip"):
        HPSv2Scorer.load(tmp_path / "bad.pt", TINY_HPS_ARCH)


def test_manifest_may_be_json_lines_and_bad_entries_name_the_problem(tmp_path):
    from multisubject.scoring.evaluate import ManifestError, parse_sample, read_manifest

    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "references": ["r.png"]}\n')
    entries = read_manifest(tmp_path / "m.jsonl")
    assert entries == [{"image": "a.png", "references": ["r.png"]}]
    with pytest.raises(ManifestError, match="reference 0 image .*r.png does not exist"):
        parse_sample(entries[0], 0, tmp_path)
    with pytest.raises(ManifestError, match="entry lacks references"):
        parse_sample({"image": "a.png"}, 0, tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "r.png")
    with pytest.raises(ManifestError, match="layout: layout has 2 region.s. but 1 subject"):
        parse_sample({"image": "a.png", "references": ["r.png"],
                      "layout": {"width": 8, "height": 8, "boxes": [[0, 0, 1, 1], [0, 0, 1, 1]]}}, 0, tmp_path)
