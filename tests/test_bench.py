"""The benchmark: PIE-Bench-format loading, metrics against their definitions, the resumable
runner, the 2-process gloo merge, and the report. Tiny random models only; no downloads."""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spdinv.bench import metrics as M
from spdinv.bench.datasets import bracketed_words, load_dataset, strip_markup
from spdinv.masks import rle_decode, rle_encode
from spdinv.bench.report import load_results, mean, write_report
from spdinv.bench.results import PartWriter, columns, cut_torn_tail, read_rows
from spdinv.bench.runner import BenchOptions, EditOutcome, run_benchmark
from spdinv.cli import main
from spdinv.errors import SpdinvError

NO_MODELS = M.EvaluationModels(dino=None, clip=None)
FAST_METRICS = ["psnr", "mse", "ssim", "gt_psnr", "gt_ssim", "noise_error", "reconstruction_error",
                "network_calls", "seconds", "edit_seconds"]


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(autouse=True)
def _one_thread():
    """Rows computed here and in child processes (one thread each) must agree to the last digit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A 5-pair world export (categories 0, 1, 2, 3, 8 in PIE-Bench's mix)."""
    from spdinv.world.dataset import export

    return export(tmp_path_factory.mktemp("world") / "data", 5, seed=3)


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-vit")
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from spdinv.world.tokenizer import build_tokenizer, text_config_fields

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    folder = tmp_path_factory.mktemp("tiny-clip")
    config = CLIPConfig(
        text_config=dict(**text_config_fields(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def fake_edit(request):
    """A deterministic stand-in for spdinv.editing.edit: a real inversion with the tiny model, and
    an 'edit' that depends on the inversion and the engine name."""
    from spdinv.inversion import invert

    options = {k: v for k, v in request.inversion_options.items() if request.inversion == "spdinv"}
    inversion = invert(request.model, request.image, request.item.source_prompt, request.inversion,
                       num_steps=request.steps, seed=request.seed, progress=False, **options)
    shift = int(inversion.z_T.abs().mean() * 40) + len(request.engine)
    array = (np.asarray(request.image).astype(np.int16) + shift) % 256
    return EditOutcome(Image.fromarray(array.astype(np.uint8)), inversion)


def failing_edit(request):
    raise SpdinvError("engine says no")


def options(data, out, **extra):
    settings = dict(inversions=["ddim", "spdinv"], engines=["p2p", "pnp"], steps=2, metrics=FAST_METRICS,
                    evaluation=NO_MODELS, inversion_options={"K": 2}, progress=False)
    settings.update(extra)
    return BenchOptions(data=Path(data), out=Path(out), **settings)


def without_timings(path: Path) -> str:
    """The CSV with its wall-clock columns blanked: everything else must be identical."""
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    timing = [header.index(c) for c in M.TIMING_METRICS if c in header]
    out = [lines[0]]
    for line in lines[1:]:
        cells = line.split(",")
        for i in timing:
            cells[i] = ""
        out.append(",".join(cells))
    return "\n".join(out) + "\n"


def unit(array) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array, dtype=np.float32)).permute(2, 0, 1)[None]


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- masks and the loader


def test_rle_decode_of_a_known_list_and_the_official_border():
    mask = rle_decode([6, 2, 12, 3], (4, 5), official_border=False)
    expected = np.zeros((4, 5), np.uint8)
    expected.flat[[6, 7, 12, 13, 14]] = 1
    assert np.array_equal(mask, expected)
    bordered = rle_decode([6, 2, 12, 3], (4, 5))
    assert bordered[0].all() and bordered[-1].all() and bordered[:, 0].all() and bordered[:, -1].all()
    assert bordered[1:-1, 1:-1].tolist() == [[1, 1, 0], [0, 1, 1]]
    assert rle_encode(expected) == [6, 2, 12, 3]


def test_world_export_loads_with_prompts_blend_words_masks_and_truth(world):
    dataset = load_dataset(world)
    mapping = json.loads((world / "mapping_file.json").read_text())
    assert [i.id for i in dataset.items] == list(mapping) and not dataset.missing
    for item in dataset.items:
        entry = mapping[item.id]
        assert "[" not in item.target_prompt and item.target_prompt == strip_markup(entry["editing_prompt"])
        assert item.edited_words == bracketed_words(entry["editing_prompt"])
        assert item.edited_words or item.category == "3"  # a deletion brackets nothing
        words = entry["blended_word"].split()
        assert item.blend_words == (tuple(words) if words else None)
        assert item.category == entry["editing_type_id"] and item.image_size == (64, 64)
        assert np.array_equal(item.mask(), rle_decode(entry["mask"], 64))
        assert item.ground_truth.target_image.is_file() and item.ground_truth.target_scene["objects"]
    assert [i.category for i in dataset.select(["delete object", "8"]).items] == ["3", "8"]
    assert len(dataset.select(limit=2).items) == 2
    with pytest.raises(SpdinvError, match="unknown category"):
        dataset.select(["teleport"])


def test_pie_bench_layout_without_ground_truth(tmp_path):
    image = tmp_path / "annotation_images" / "0_random_140" / "000000000000.jpg"
    image.parent.mkdir(parents=True)
    Image.new("RGB", (16, 16), "white").save(image)
    mapping = {"000000000000": {"image_path": "0_random_140/000000000000.jpg",
                                "original_prompt": "a [cat] sitting", "editing_prompt": "a [dog] sitting",
                                "editing_instruction": "make it a dog", "editing_type_id": "0",
                                "blended_word": "cat dog", "mask": [17, 3]}}
    (tmp_path / "mapping_file.json").write_text(json.dumps(mapping))
    item = load_dataset(tmp_path).items[0]
    assert (item.source_prompt, item.target_prompt, item.edited_words) == ("a cat sitting", "a dog sitting", ("dog",))
    assert item.blend_words == ("cat", "dog") and item.ground_truth is None
    assert item.mask()[1, 1:4].tolist() == [1, 1, 1] and item.mask().sum() == 60 + 3  # the border plus the run


def test_bad_dataset_input_is_one_line(tmp_path, world):
    with pytest.raises(SpdinvError, match="no mapping_file.json") as error:
        load_dataset(tmp_path)
    assert "\n" not in str(error.value)
    bad = tmp_path / "bad"
    shutil.copytree(world, bad)
    mapping = json.loads((bad / "mapping_file.json").read_text())
    first = next(iter(mapping))
    mapping[first]["mask"] = [3, 1, 7]
    (bad / "mapping_file.json").write_text(json.dumps(mapping))
    with pytest.raises(SpdinvError, match=f"item {first}: malformed mask") as error:
        load_dataset(bad)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- metrics against their definitions


def test_psnr_matches_torchmetrics():
    from torchmetrics.functional.image import peak_signal_noise_ratio

    from spdinv.images import psnr

    generator = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    b = (a + 0.1 * torch.randn(a.shape, generator=generator)).clamp(-1, 1)
    expected = float(peak_signal_noise_ratio((a + 1) / 2, (b + 1) / 2, data_range=1.0))
    assert psnr(a, b) == pytest.approx(expected, rel=1e-5)
    assert psnr((a + 1) / 2, (b + 1) / 2, (0.0, 1.0)) == pytest.approx(expected, rel=1e-5)  # the benchmark's range


def test_identical_images_give_inf_psnr_zero_mse_unit_ssim():
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    scores = M.background_scores(image, image.clone(), torch.zeros(1, 1, 32, 32))
    assert scores == {"psnr": math.inf, "mse": 0.0, "ssim": pytest.approx(1.0, abs=1e-6)}
    stat = mean([math.inf, 20.0, 30.0, math.nan])  # the report's mean: finite values, left-outs counted
    assert (stat.value, stat.count, stat.left_out) == (25.0, 2, 2)


def test_background_metrics_on_a_known_mask():
    source = torch.full((1, 3, 32, 32), 0.5)
    edited = source + 0.1
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :, 16:] = 1  # the right half is the edit region
    edited_only_inside = torch.where(mask.bool(), torch.rand(1, 3, 32, 32), source)
    assert M.background_scores(source, edited_only_inside, mask)["mse"] == 0.0  # the edit region never counts
    scores = M.background_scores(source, edited, mask)
    assert scores["mse"] == pytest.approx(0.01 / 2, rel=1e-4)  # half the frame differs by 0.1
    assert scores["psnr"] == pytest.approx(10 * math.log10(1 / 0.005), rel=1e-4)
    from skimage.metrics import structural_similarity

    keep = (1 - mask)[0, 0].numpy()
    a, b = (source[0] * keep).permute(1, 2, 0).numpy(), (edited[0] * keep).permute(1, 2, 0).numpy()
    reference = structural_similarity(a, b, channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False)
    # the official SSIM drops the map's 5-px border, as skimage does (so its padding never counts). In float32
    # the variances E[x²] - μ² of these flat regions cancel to rounding noise (~6e-5 on SSIM); in float64
    # the two agree to 1e-6.
    assert scores["ssim"] == pytest.approx(reference, abs=1e-4)
    a64, b64 = (source * (1 - mask)).double(), (edited * (1 - mask)).double()
    reference64 = structural_similarity(a64[0].permute(1, 2, 0).numpy(), b64[0].permute(1, 2, 0).numpy(), channel_axis=2,
                                        data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert M.ssim(a64, b64) == pytest.approx(reference64, abs=1e-6)
    assert all(math.isnan(v) for v in M.background_scores(source, edited, torch.ones(1, 1, 32, 32)).values())


def test_ground_truth_region_scores_use_the_edit_region_only():
    target = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    edited = torch.where(mask.bool(), target, torch.zeros_like(target))  # right inside, wrong outside
    assert M.region_scores(edited, target, mask)["gt_psnr"] == math.inf


def test_structure_distance_is_mse_of_dino_key_self_similarities(tiny_vit_dir):
    structure = M.load_dino(str(tiny_vit_dir))
    generator = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 3, 48, 48, generator=generator), torch.rand(1, 3, 48, 48, generator=generator)
    assert structure(a, a) == 0.0
    # by hand: the last block's keys = its key projection of its layer-normed input
    model = structure.model
    with torch.no_grad():
        def self_similarity(image):
            hidden = model(pixel_values=structure._prepare(image), output_hidden_states=True).hidden_states[-2]
            keys = structure._key_projection(_layernorm_before(model)(hidden))[0]
            unit_keys = keys / keys.norm(dim=-1, keepdim=True)
            return unit_keys @ unit_keys.T
        expected = float(((self_similarity(a) - self_similarity(b)) ** 2).mean())
    assert structure(a, b) == pytest.approx(expected, rel=1e-5) and expected > 0
    tokens = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    assert M.cosine_self_similarity(tokens).tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]


def _layernorm_before(model):
    norms = [m for name, m in model.named_modules() if name.endswith("layernorm_before")]
    return norms[-1]


def test_clip_score_is_100_times_clamped_cosine(tiny_clip_dir):
    scorer = M.load_clip(str(tiny_clip_dir))
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    text = "a large red circle in the centre on a white background"
    with torch.no_grad():
        pixels = scorer.processor(images=[(image[0] * 255).round().to(torch.uint8)], return_tensors="pt")["pixel_values"]
        tokens = scorer.processor(text=[text], return_tensors="pt", padding=True)
        image_features = _features(scorer.model.model.get_image_features(pixels))
        text_features = _features(scorer.model.model.get_text_features(**tokens))
        cosine = torch.nn.functional.cosine_similarity(image_features, text_features).item()
    assert scorer(image, text) == pytest.approx(100 * max(cosine, 0.0), abs=1e-3)
    mask = torch.zeros(1, 1, 32, 32)
    scores = scorer.whole_and_edited(image, mask, text)
    assert math.isnan(scores["clip_edited"]) and scores["clip_whole"] >= 0


def _features(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_absent_evaluation_models_are_one_line_each_and_the_rest_runs(tmp_path):
    evaluator = M.Evaluator(["structure_distance", "psnr", "clip_whole", "lpips"],
                            M.EvaluationModels(dino=str(tmp_path / "no-dino"), clip=str(tmp_path / "no-clip"),
                                               lpips_backbone=str(tmp_path / "no-weights.pth")))
    assert set(evaluator.unavailable) == {"structure_distance", "clip_whole", "lpips"}
    assert len(evaluator.notices) == 3 and all("\n" not in n and "unavailable" in n for n in evaluator.notices)
    image = Image.new("RGB", (32, 32), "gray")
    scores = evaluator.evaluate(M.Sample(image, image, np.zeros((32, 32), np.uint8), "a gray square"))
    assert scores["psnr"] == math.inf and math.isnan(scores["structure_distance"]) and math.isnan(scores["lpips"])


def test_unknown_metric_is_one_line_error():
    with pytest.raises(SpdinvError, match="unknown metric sharpness; valid: structure_distance") as error:
        M.parse_metrics("psnr,sharpness")
    assert "\n" not in str(error.value)
    assert M.parse_metrics("ssim,psnr") == ["psnr", "ssim"]


def test_edit_accuracy_compares_the_reading_with_the_target_scene(world, monkeypatch):
    import spdinv.world.classifier as classifier

    item = next(i for i in load_dataset(world).items if i.category == "1")
    truth = item.ground_truth

    def reading_of(scene: dict):
        objects = {o["position"]: {k: o[k] for k in classifier.SLOT_HEADS} for o in scene["objects"]}
        return classifier.SceneReading(objects, scene["background"], scene["background_kind"])

    judge = M.EditJudge(classifier=None)
    seen = []
    for scene, expected in ((truth.target_scene, 1.0), (truth.source_scene, 0.0)):
        monkeypatch.setattr(classifier, "read_scenes", lambda _model, pixels, s=scene: seen.append(pixels.shape) or [reading_of(s)])
        assert judge(item.load_image().resize((32, 32)), truth.target_scene) == expected
    assert seen == [(1, 3, 64, 64)] * 2  # the classifier always sees 64x64


@pytest.mark.skipif(not Path(M.__file__).parent.parent.joinpath("assets", "attribute-classifier.safetensors").exists(),
                    reason="the attribute classifier is not trained yet")
def test_edit_accuracy_judges_the_rendered_target(world):
    judge = M.load_judge(None)
    item = load_dataset(world).items[1]
    assert judge(item.load_target(), item.ground_truth.target_scene) == 1.0
    assert judge(item.load_image(), item.ground_truth.target_scene) == 0.0


# ---------------------------------------------------------------- the runner: rows, resume, failures


def test_run_writes_one_row_per_image_inversion_engine(tmp_path, world, tiny):
    summary = run_benchmark(options(world, tmp_path / "out", limit=2, save_images=True), fake_edit, tiny)
    rows = read_rows(summary.results)
    ids = [i.id for i in load_dataset(world).items[:2]]
    assert [(r["id"], r["inversion"], r["engine"]) for r in rows] == [
        (i, inv, eng) for i in ids for inv in ("ddim", "spdinv") for eng in ("p2p", "pnp")]
    assert all(r["error"] == "" and float(r["mse"]) > 0 and r["network_calls"] for r in rows)
    assert int(rows[0]["network_calls"]) == 2 and int(rows[2]["network_calls"]) > 2  # ddim vs spdinv (K=2)
    assert len(list((tmp_path / "out" / "diagnostics").glob("*.json"))) == 8
    assert len(list((tmp_path / "out" / "images" / "spdinv+pnp").glob("*.png"))) == 2
    assert not (tmp_path / "out" / "parts").exists()
    assert json.loads((tmp_path / "out" / "run.json").read_text())["seed"] == 1234


def test_resume_after_a_limited_run_gives_the_uninterrupted_csv(tmp_path, world, tiny):
    whole = run_benchmark(options(world, tmp_path / "whole"), fake_edit, tiny).results
    first = run_benchmark(options(world, tmp_path / "resumed", limit=2), fake_edit, tiny)
    assert first.computed == 8
    again = run_benchmark(options(world, tmp_path / "resumed"), fake_edit, tiny)
    assert (again.computed, again.skipped) == (12, 8)
    assert without_timings(again.results) == without_timings(whole)
    done = run_benchmark(options(world, tmp_path / "resumed"), fake_edit, tiny)
    assert done.computed == 0 and without_timings(done.results) == without_timings(whole)


def test_torn_last_line_is_cut_and_never_duplicated(tmp_path):
    header = columns(["psnr"])
    path = tmp_path / "parts" / "rank-0.csv"
    writer = PartWriter(path, header)
    writer.append({"id": "a", "category": "1", "inversion": "ddim", "engine": "p2p", "psnr": "20", "error": ""})
    writer.close()
    with path.open("a") as handle:
        handle.write("b,1,ddim,p2p,2")  # a write cut short by SIGKILL
    assert [r["id"] for r in read_rows(path, header)] == ["a"]
    writer = PartWriter(path, header)  # reopening cuts the torn tail
    writer.append({"id": "b", "category": "1", "inversion": "ddim", "engine": "p2p", "psnr": "21", "error": ""})
    writer.close()
    assert path.read_text().splitlines()[1:] == ["a,1,ddim,p2p,20,", "b,1,ddim,p2p,21,"]
    assert cut_torn_tail(path) == 0
    with pytest.raises(SpdinvError, match="other columns"):
        PartWriter(path, columns(["ssim"]))


KILLED_RUN = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import conftest, test_bench
    from spdinv.bench.runner import run_benchmark
    from spdinv.testing import tiny_model

    def slow_edit(request):
        time.sleep(0.3)
        return test_bench.fake_edit(request)

    with conftest.unet_rounding():  # the rows are compared with this process's
        run_benchmark(test_bench.options({data!r}, {out!r}), slow_edit, tiny_model())
""")


def test_sigkill_loses_only_rows_in_flight_and_resume_completes(tmp_path, world, tiny):
    whole = run_benchmark(options(world, tmp_path / "whole"), fake_edit, tiny).results
    out = tmp_path / "killed"
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), data=str(world), out=str(out))
    process = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    part = out / "parts" / "rank-0.csv"
    deadline = time.time() + 90
    while time.time() < deadline and (not part.exists() or part.read_text().count("\n") < 4):
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    kept = read_rows(part, columns(FAST_METRICS))
    assert 3 <= len(kept) < 20 and not (out / "results.csv").exists()
    with part.open("a") as handle:
        handle.write(part.read_text().splitlines()[-1][:9])  # and a torn line on top
    resumed = run_benchmark(options(world, out), fake_edit, tiny)
    assert resumed.skipped == len(kept)
    assert without_timings(resumed.results) == without_timings(whole)


def test_missing_image_is_skipped_and_listed_and_edit_errors_recorded(tmp_path, world, tiny, capsys):
    data = tmp_path / "data"
    shutil.copytree(world, data)
    gone = load_dataset(data).items[1]
    gone.image_path.unlink()
    summary = run_benchmark(options(data, tmp_path / "out", engines=["p2p"], inversions=["ddim"], inversion_options={}), failing_edit, tiny)
    assert summary.missing == [gone.id] and "skipped 1 id(s) whose image is missing" in capsys.readouterr().err
    assert (tmp_path / "out" / "missing.txt").read_text().split() == [gone.id]
    rows = read_rows(summary.results)
    assert len(rows) == 4 and gone.id not in {r["id"] for r in rows}
    assert all(r["error"] == "engine says no" and r["psnr"] == "nan" for r in rows) and summary.failed == 4


def test_resume_with_other_settings_is_refused(tmp_path, world, tiny):
    run_benchmark(options(world, tmp_path / "out", limit=1, engines=["p2p"]), fake_edit, tiny)
    with pytest.raises(SpdinvError, match="other settings \\(steps"):
        run_benchmark(options(world, tmp_path / "out", limit=1, steps=3), fake_edit, tiny)
    with pytest.raises(SpdinvError, match="inversion option K applies to none of ddim"):
        run_benchmark(options(world, tmp_path / "other", inversions=["ddim"]), fake_edit, tiny)
    with pytest.raises(SpdinvError, match="engine option warp applies to none of p2p"):
        run_benchmark(options(world, tmp_path / "other", engine_options={"warp": 1}, engines=["p2p"]), fake_edit, tiny)


def test_default_edit_uses_spdinv_editing_and_inverts_once_per_method(tmp_path, world, tiny, monkeypatch):
    import spdinv.editing

    real_invert, calls = spdinv.editing.run_method, []
    monkeypatch.setattr(spdinv.editing, "run_method", lambda *a, **k: calls.append(a[3]) or real_invert(*a, **k))
    summary = run_benchmark(options(world, tmp_path / "out", limit=2, engines=["p2p", "masactrl"]), model=tiny)
    rows = read_rows(summary.results)
    assert len(rows) == 8 and all(r["error"] == "" for r in rows), [r["error"] for r in rows]
    assert calls == ["ddim", "spdinv"] * 2  # shared by both engines
    assert all(float(r["noise_error"]) > 0 and float(r["reconstruction_error"]) >= 0 for r in rows)
    first, second = rows[0], rows[1]  # ddim + p2p, ddim + masactrl: one inversion, two edits
    assert first["noise_error"] == second["noise_error"] and first["mse"] != second["mse"]


def test_default_edit_keeps_one_engines_error_in_its_own_row(tmp_path, world, tiny, monkeypatch):
    """Blend words the prompts lack fail p2p's word check, which `edits()` runs for every engine
    before inverting: the group falls back to one engine at a time, so masactrl's row is unharmed."""
    import spdinv.editing

    real_invert, calls = spdinv.editing.run_method, []
    monkeypatch.setattr(spdinv.editing, "run_method", lambda *a, **k: calls.append(a[3]) or real_invert(*a, **k))
    summary = run_benchmark(options(world, tmp_path / "out", limit=1, inversions=["ddim"], inversion_options={},
                                    engines=["masactrl", "p2p"], engine_options={"blend": "zebra giraffe"}),
                            model=tiny)
    rows = {r["engine"]: r for r in read_rows(summary.results)}
    assert rows["masactrl"]["error"] == "" and "zebra" in rows["p2p"]["error"]
    assert calls == ["ddim"]  # the failing group inverted nothing; masactrl alone inverted once


# ---------------------------------------------------------------- two processes on gloo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, data: str, out: str, model: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import conftest

    with conftest.unet_rounding():  # as in the single-process run the merged CSV is compared with
        run_benchmark(options(data, out, limit=3, model=model), fake_edit)


def test_two_gloo_processes_merge_to_the_single_process_csv(tmp_path, world, tiny_dir):
    single = run_benchmark(options(world, tmp_path / "one", limit=3, model=str(tiny_dir)), fake_edit).results
    torch.multiprocessing.spawn(_rank_main, args=(2, _free_port(), str(world), str(tmp_path / "two"), str(tiny_dir)),
                                nprocs=2, join=True)
    merged = tmp_path / "two" / "results.csv"
    assert without_timings(merged) == without_timings(single)
    assert not (tmp_path / "two" / "parts").exists()


# ---------------------------------------------------------------- report and command line


def test_report_tables_in_paper_scales_with_categories_and_plots(tmp_path, world, tiny):
    out = tmp_path / "out"
    results = run_benchmark(options(world, out), fake_edit, tiny).results
    rows = read_rows(results)
    report = write_report(out)
    text = report.read_text()
    assert "MSE ×10⁴ ↓" in text and "SSIM ×10² ↑" in text and "## Per category" in text and "3 delete object" in text
    ddim_p2p = [float(r["mse"]) for r in rows if (r["inversion"], r["engine"]) == ("ddim", "p2p")]
    assert f"{sum(ddim_p2p) / len(ddim_p2p) * 1e4:.2f}" in text
    plots = {p.name for p in (out / "report" / "plots").iterdir()}
    assert {"psnr.png", "mse.png", "steps-iterations.png", "steps-residuals.png"} <= plots
    assert load_results(results).methods == [("ddim", "p2p"), ("spdinv", "p2p"), ("ddim", "pnp"), ("spdinv", "pnp")]
    assert "examples.png" not in plots  # no saved images, no example grid


def test_report_example_grid_from_saved_images(tmp_path, world, tiny):
    from PIL import Image

    out = tmp_path / "out"
    run_benchmark(options(world, out, limit=3, save_images=True), fake_edit, tiny)
    text = write_report(out).read_text()
    grid = Image.open(out / "report" / "plots" / "examples.png")
    assert "plots/examples.png" in text
    categories = {item.category for item in load_dataset(world).items}
    cell = 192  # 64-pixel images enlarged 3x
    assert grid.width > 6 * cell  # source, target and four inversion + engine columns
    assert grid.height > len(categories) * cell


def test_cli_bench_then_report(tmp_path, world, tiny_dir, capsys, monkeypatch):
    out = tmp_path / "out"
    common = ["--inversion", "ddim,spdinv", "--limit", "1", "--model", tiny_dir, "--steps", "2", "--K", "2", "--dino", "none",
              "--clip", "none", "--metrics", "psnr,ssim,noise_error", "--quiet", "--out", out]
    first = ["bench", world, "--engine", "p2p", *common]
    monkeypatch.setattr(sys, "argv", ["spdinv", *map(str, first)])
    code, stdout, err = run_cli(first, capsys)
    assert code == 0 and "2 rows computed" in stdout, err
    assert read_rows(out / "results.csv")[1]["inversion"] == "spdinv"
    second = ["bench", world, "--engine", "pnp", *common]  # the same settings, another engine, same folder
    monkeypatch.setattr(sys, "argv", ["spdinv", *map(str, second)])
    code, stdout, err = run_cli(second, capsys)
    assert code == 0 and "2 rows computed" in stdout, err
    assert [r["engine"] for r in read_rows(out / "results.csv")] == ["p2p", "p2p", "pnp", "pnp"]
    code, stdout, _ = run_cli(["report", out], capsys)
    report = (out / "report" / "report.md").read_text()
    assert code == 0 and "--engine p2p" in report and "--engine pnp" in report


def test_cli_bad_input_is_one_line(tmp_path, world, capsys):
    code, _, err = run_cli(["bench", tmp_path, "--inversion", "ddim", "--engine", "p2p"], capsys)
    assert code == 2 and "no mapping_file.json" in err and err.count("\n") == 1
    code, _, err = run_cli(["bench", world, "--inversion", "ddim", "--engine", "p2p", "--metrics", "psnr,bogus"], capsys)
    assert code == 2 and "unknown metric bogus" in err and err.count("\n") == 1
    code, _, err = run_cli(["bench", world, "--inversion", "magic", "--engine", "p2p"], capsys)
    assert code == 2 and "unknown inversion method 'magic'" in err
    code, _, err = run_cli(["report", tmp_path / "nothing"], capsys)
    assert code == 2 and "no results" in err and err.count("\n") == 1


# ---------------------------------------------------------------- the official evaluator, number for number


def _random_squeezenet_file(folder: Path) -> tuple[Path, torch.nn.Sequential]:
    """A SqueezeNet 1.1 weights file laid out as torch hub caches torchvision's (HUB/checkpoints/NAME),
    holding random weights under torchvision's keys (features.*, classifier.1.*)."""
    from spdinv.bench.lpips import BACKBONE_FILE, squeezenet1_1_features

    torch.manual_seed(0)
    features = squeezenet1_1_features()
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state.update({"classifier.1.weight": torch.randn(10, 512, 1, 1), "classifier.1.bias": torch.zeros(10)})
    path = folder / "checkpoints" / BACKBONE_FILE
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path, features


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to download fails the test."""
    import urllib.request

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to download: {args[:1]}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def test_lpips_offline_from_the_hub_cache_equals_torchmetrics_lpips(tmp_path, monkeypatch, no_network):
    import torchmetrics.functional.image.lpips as tm_lpips

    from spdinv.bench.lpips import BACKBONE_FILE

    hub = tmp_path / "hub"
    _, features = _random_squeezenet_file(hub)
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    try:
        evaluator = M.Evaluator(["lpips"], NO_MODELS)
    finally:
        torch.hub.set_dir(previous)
    assert not evaluator.unavailable, evaluator.notices
    generator = torch.Generator().manual_seed(1)
    a = torch.rand(1, 3, 64, 64, generator=generator)
    b = (a + 0.2 * torch.rand(1, 3, 64, 64, generator=generator)).clamp(0, 1)
    ours = evaluator._scorers["lpips"](a, b)
    # torchmetrics' own LPIPS module (what PIE-Bench's evaluator runs), on the same SqueezeNet layers
    monkeypatch.setattr(tm_lpips, "_get_tv_model_features", lambda net, pretrained=False: features)
    reference = float(tm_lpips._LPIPS(pretrained=True, net="squeeze")(a * 2 - 1, b * 2 - 1).mean())
    assert ours == pytest.approx(reference, rel=1e-5) and reference > 0
    assert evaluator._scorers["lpips"](a, a) == 0.0
    # the same file given with --lpips-backbone, from anywhere
    moved = tmp_path / "elsewhere.pth"
    shutil.copy(hub / "checkpoints" / BACKBONE_FILE, moved)
    direct = M.Evaluator(["lpips"], M.EvaluationModels(dino=None, clip=None, lpips_backbone=str(moved)))
    assert direct._scorers["lpips"](a, b) == ours


def test_lpips_weights_problems_are_one_line_unavailable_never_a_download(tmp_path, no_network):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(3, 3, 3, 3)}, wrong)
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "empty-hub"))
    try:
        hub_missing = M.Evaluator(["lpips", "psnr"], NO_MODELS)
    finally:
        torch.hub.set_dir(previous)
    reason = hub_missing.unavailable["lpips"]
    assert str(tmp_path / "empty-hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth") in reason and "--lpips-backbone" in reason
    for backbone, expected in ((tmp_path / "absent.pth", "not found"), (garbage, "cannot read"),
                               (wrong, "not torchvision's SqueezeNet 1.1")):
        evaluator = M.Evaluator(["lpips", "psnr"], M.EvaluationModels(dino=None, clip=None, lpips_backbone=str(backbone)))
        assert list(evaluator.unavailable) == ["lpips"] and expected in evaluator.unavailable["lpips"]
        assert len(evaluator.notices) == 1 and "\n" not in evaluator.notices[0]


def test_mask_runs_past_the_frame_are_clipped_like_the_official_decoder(tmp_path, world, tiny, capsys):
    from spdinv.masks import runs_past_frame

    def official(encoded, shape):  # PIE-Bench's mask_decode, loop for loop
        length = shape[0] * shape[1]
        flat = np.zeros(length)
        for i in range(0, len(encoded), 2):
            for j in range(min(encoded[i + 1], length - encoded[i])):
                flat[encoded[i] + j] = 1
        array = flat.reshape(shape)
        array[0, :] = array[-1, :] = array[:, 0] = array[:, -1] = 1
        return array

    rle = [3, 2, 15, 9, 30, 4]  # 4x5 frame: the second run ends past it, the third starts past it
    assert np.array_equal(rle_decode(rle, (4, 5)), official(rle, (4, 5)))
    assert runs_past_frame(rle, (4, 5)) == 2 and runs_past_frame([3, 2], (4, 5)) == 0
    data = tmp_path / "data"
    shutil.copytree(world, data)
    mapping = json.loads((data / "mapping_file.json").read_text())
    first = next(iter(mapping))
    mapping[first]["mask"] = mapping[first]["mask"] + [64 * 64 - 10, 50]
    (data / "mapping_file.json").write_text(json.dumps(mapping))
    dataset = load_dataset(data)
    item = dataset.items[0]
    assert item.mask_runs_clipped == 1 and item.mask()[-1, -10:].all()
    summary = run_benchmark(options(data, tmp_path / "out", limit=1, engines=["p2p"], inversions=["ddim"],
                                    inversion_options={}), fake_edit, tiny)
    notes = [line for line in capsys.readouterr().err.splitlines() if "went past the frame" in line]
    assert notes == [f"note: 1 mask run(s) in 1 item(s) went past the frame and were clipped there, "
                     f"as PIE-Bench's decoder does ({first})"]
    assert read_rows(summary.results)[0]["error"] == ""


def _pie_bench_copy(world: Path, folder: Path) -> Path:
    """The world export without its ground truth: a folder laid out like the real PIE-Bench."""
    shutil.copytree(world, folder)
    mapping = json.loads((folder / "mapping_file.json").read_text())
    for entry in mapping.values():
        for key in ("target_image_path", "source_scene", "target_scene"):
            entry.pop(key, None)
    (folder / "mapping_file.json").write_text(json.dumps(mapping))
    return folder


def _rescore(out: Path, data: Path, metrics: list[str], limit: int) -> dict[tuple, dict[str, str]]:
    """Score the saved images with a fresh evaluator, as the official evaluator reads them (no JPEG again)."""
    from spdinv.bench.results import format_value

    evaluator = M.Evaluator(metrics, NO_MODELS)
    rows = {}
    for item in load_dataset(data).items[:limit]:
        for folder in sorted((out / "images").iterdir()):
            saved = next(folder.glob(f"{item.image_path.stem}.*"))
            with Image.open(saved) as image:
                edited = image.convert("RGB")
            scores = evaluator.evaluate(M.Sample(item.load_image(), edited, item.mask(), item.target_prompt))
            rows[(item.id, *folder.name.split("+"))] = {m: format_value(v) for m, v in scores.items()}
    return rows


@pytest.mark.parametrize("protocol, suffix, magic", [("pie-bench", ".jpg", b"\xff\xd8"), ("lossless", ".png", b"\x89PNG")])
def test_saved_images_are_what_was_scored_and_rescore_to_the_csv(tmp_path, world, tiny, protocol, suffix, magic):
    data = _pie_bench_copy(world, tmp_path / "data")
    metrics = ["psnr", "mse", "ssim"]
    out = tmp_path / protocol
    summary = run_benchmark(options(data, out, limit=2, engines=["p2p"], metrics=metrics, protocol=protocol,
                                    save_images=True), fake_edit, tiny)
    saved = sorted((out / "images").rglob("*"))
    assert {p.suffix for p in saved if p.is_file()} == {suffix} and all(
        p.read_bytes().startswith(magic) for p in saved if p.is_file())
    rescored = _rescore(out, data, metrics, limit=2)
    rows = read_rows(summary.results)
    assert len(rows) == len(rescored) == 4
    for row in rows:
        assert {m: row[m] for m in metrics} == rescored[(row["id"], row["inversion"], row["engine"])]
    settings = json.loads((out / "run.json").read_text())
    assert settings["protocol"] == protocol and settings["structure_resize"] == (
        "official" if protocol == "pie-bench" else "antialias")
    assert "border of the SSIM map dropped" in settings["evaluator"]["ssim"]


def test_protocol_defaults_jpeg_effect_and_report(tmp_path, world, tiny):
    data = _pie_bench_copy(world, tmp_path / "data")
    common = dict(limit=2, engines=["p2p"], inversions=["ddim"], inversion_options={}, metrics=["psnr", "mse", "ssim"])
    pie = run_benchmark(options(data, tmp_path / "pie", **common), fake_edit, tiny)
    world_run = run_benchmark(options(world, tmp_path / "world", **common), fake_edit, tiny)
    assert json.loads((tmp_path / "pie" / "run.json").read_text())["protocol"] == "pie-bench"  # the real layout
    assert json.loads((tmp_path / "world" / "run.json").read_text())["protocol"] == "lossless"  # a world export
    jpeg, lossless = read_rows(pie.results), read_rows(world_run.results)
    assert all(float(j["psnr"]) != float(l["psnr"]) for j, l in zip(jpeg, lossless))  # the round trip counts
    with pytest.raises(SpdinvError, match="other settings \\(protocol"):
        run_benchmark(options(data, tmp_path / "pie", protocol="lossless", **common), fake_edit, tiny)
    text = write_report(tmp_path / "pie").read_text()
    assert "- protocol: pie-bench (each edit scored after a JPEG quality-75 round trip" in text
    assert "structure-distance resize official" in text and "Means: PSNR, LPIPS, MSE and SSIM" in text


def test_structure_resize_official_is_bilinear_without_antialiasing(tiny_vit_dir):
    image = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    official = M.Evaluator(["structure_distance"], M.EvaluationModels(dino=str(tiny_vit_dir), clip=None))
    smooth = M.Evaluator(["structure_distance"], M.EvaluationModels(dino=str(tiny_vit_dir), clip=None,
                                                                   structure_resize="antialias"))
    expected = torch.nn.functional.interpolate(image * 255, size=(32, 32), mode="bilinear", align_corners=False)
    mean, std = torch.tensor(M.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(M.IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(official._scorers["dino"]._prepare(image), (expected - mean) / std, atol=1e-4)
    other = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    assert official._scorers["dino"](image, other) != smooth._scorers["dino"](image, other)
    with pytest.raises(SpdinvError, match="unknown structure resize"):
        M.StructureDistance(official._scorers["dino"].model, resize="cubic")


def test_clip_image_processor_is_pinned_to_the_pil_one(tiny_clip_dir):
    scorer = M.load_clip(str(tiny_clip_dir))
    assert type(scorer.processor.image_processor) is M.clip_image_processor_class()
    assert "Pil" in M.clip_image_processor_class().__name__ or not hasattr(__import__("transformers"), "CLIPImageProcessorPil")


def test_means_use_the_same_rows_for_every_background_column(tmp_path):
    header = "id,category,inversion,engine,psnr,mse,ssim,clip_whole,error\n"
    rows = ["a,1,ddim,p2p,inf,0.0,1.0,20,", "b,1,ddim,p2p,30,0.001,0.9,22,", "c,1,ddim,p2p,20,0.01,0.7,24,",
            "d,1,ddim,p2p,nan,nan,nan,26,"]
    (tmp_path / "results.csv").write_text(header + "\n".join(rows) + "\n")
    results = load_results(tmp_path / "results.csv")
    method = ("ddim", "p2p")
    for metric, expected in (("psnr", 25.0), ("mse", 0.0055), ("ssim", 0.8)):  # rows b and c only, all three
        stat = results.mean(metric, method)
        assert (stat.value, stat.count, stat.left_out) == (pytest.approx(expected), 2, 2)
    clip = results.mean("clip_whole", method)  # not a background metric: every row where it is finite
    assert (clip.value, clip.count) == (23.0, 4)
    text = write_report(tmp_path / "results.csv").read_text()
    assert "| 80.00 |" in text and "mse: 2 row(s) left out of the means (identical backgrounds give PSNR +inf" in text


def test_non_square_sources_are_scored_on_the_square_the_model_saw(tmp_path):
    from spdinv.bench.runner import scoring_sample
    from spdinv.images import conform_image

    image = tmp_path / "annotation_images" / "wide.png"
    image.parent.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    pixels[:, 8:40] = 128  # the centre square is flat: its reconstruction is exact
    Image.fromarray(pixels).save(image)
    mapping = {"wide": {"image_path": "wide.png", "original_prompt": "a", "editing_prompt": "b",
                        "editing_type_id": "1", "mask": [40, 3]}}
    (tmp_path / "mapping_file.json").write_text(json.dumps(mapping))
    item = load_dataset(tmp_path).items[0]
    source = item.load_image()
    model_view, _ = conform_image(source, 64)
    sample, scored = scoring_sample(item, source, item.load_target(), model_view, "lossless")
    assert sample.source.size == sample.edited.size == (32, 32)
    assert np.array_equal(np.asarray(sample.source), pixels[:, 8:40])
    assert np.array_equal(sample.mask, item.mask()[:, 8:40])
    assert M.background_scores(M.to_unit(sample.source), M.to_unit(scored.image), M.mask_tensor(sample.mask))["psnr"] == math.inf


def test_cli_protocol_and_structure_resize_options(world, capsys):
    from spdinv.commands.bench import bench_options
    from spdinv.cli import build_parser

    args = build_parser().parse_args(["bench", str(world), "--inversion", "ddim", "--engine", "p2p", "--protocol",
                                      "pie-bench", "--structure-resize", "antialias", "--lpips-backbone", "w.pth"])
    parsed = bench_options(args)
    assert (parsed.protocol, parsed.structure_resize, parsed.evaluation.lpips_backbone) == ("pie-bench", "antialias", "w.pth")
    defaults = bench_options(build_parser().parse_args(["bench", str(world), "--inversion", "ddim", "--engine", "p2p"]))
    assert (defaults.protocol, defaults.structure_resize) == (None, None)  # chosen from the folder at run time
    code, _, err = run_cli(["bench", world, "--inversion", "ddim", "--engine", "p2p", "--protocol", "png"], capsys)
    assert code == 2 and "invalid choice: 'png'" in err
