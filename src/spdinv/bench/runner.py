"""`spdinv bench`: every image x inversion x engine of a PIE-Bench-format folder, one CSV row each.

Resumable: rows already in results.csv or in a part file are skipped. Under torchrun each rank
takes every world_size-th image, appends to its own part file, and rank 0 merges after the others
are done (see results.py for the durability and ordering rules).
"""

from __future__ import annotations

import dataclasses
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..errors import SpdinvError, require_finite
from ..images import centre_square, conform_image
from ..outputs import write_atomically, write_json
from .datasets import BenchDataset, BenchItem, file_stem, load_dataset
from .distributed import ProcessGroup, Shard, current_shard
from .metrics import SSIM_VARIANT, EvaluationModels, Evaluator, Sample, clip_image_processor_class, parse_metrics
from .protocol import DEFAULT_STRUCTURE_RESIZE, PROTOCOLS, ScoredEdit, check_protocol, default_protocol, saved_name, \
    scored_edit
from .results import ERROR_COLUMN, Key, PartWriter, columns, finished_keys, format_value, merge, part_path, \
    part_paths, read_rows, recorded_settings, RESULTS_FILE, SETTINGS_FILE

# settings a resumed run must share with the run that wrote the rows it keeps
IDENTITY_SETTINGS = ("data", "model", "dtype", "steps", "seed", "metrics", "inversion_options", "engine_options",
                     "protocol", "structure_resize", "preset")


@dataclass
class BenchOptions:
    data: Path
    inversions: list[str]
    engines: list[str]
    out: Path = Path("bench-out")
    categories: list[str] | None = None
    limit: int | None = None
    model: str | None = None  # diffusers folder or hub id; None: the embedded model
    variant: str | None = None  # weight variant of the folder (fp16)
    config: str | None = None  # for a single-file model: a local diffusers folder of its family
    device: str = "cpu"
    dtype: str = "float32"
    steps: int = 50
    seed: int = 1234  # PIE-Bench's protocol seed
    metrics: list[str] = field(default_factory=lambda: parse_metrics(None))
    evaluation: EvaluationModels = field(default_factory=EvaluationModels)
    inversion_options: dict = field(default_factory=dict)  # applied to the methods they fit
    engine_options: dict = field(default_factory=dict)
    preset: str | None = None  # spdinv.presets: a published script's settings, under the options above
    save_diagnostics: bool = True
    save_images: bool = False
    progress: bool = True
    protocol: str | None = None  # a protocol.PROTOCOLS key; None: pie-bench, or lossless for world exports
    structure_resize: str | None = None  # a metrics.STRUCTURE_RESIZES key; None: the protocol's default


@dataclass(frozen=True)
class Job:
    item: BenchItem
    inversion: str
    engine: str

    @property
    def key(self) -> Key:
        return self.item.id, self.inversion, self.engine

    @property
    def name(self) -> str:
        return file_stem(f"{self.item.id}__{self.inversion}__{self.engine}")


@dataclass
class EditRequest:
    """Everything an edit function gets for one job."""

    model: object  # spdinv.model.DiffusionModel
    image: Image.Image  # the source, conformed to the model's size
    item: BenchItem
    inversion: str
    engine: str
    steps: int
    seed: int
    inversion_options: dict
    engine_options: dict
    diagnose: bool = True  # the inversion's residuals and reconstruction error are wanted
    preset: str | None = None  # spdinv.presets, under the options
    engines: tuple[str, ...] = ()  # the engines this run asks of this image x inversion, in order (an edit
    # function may compute them together); empty: this job's engine only


@dataclass
class EditOutcome:
    edited: Image.Image
    inversion: object | None = None  # spdinv.inversion.Inversion
    seconds: float | None = None  # inversion + editing time, if the edit function knows it better than wall time
    edit_calls: int | None = None  # the UNet rows of the edit's sampling, if the edit function counts them


EditFunction = Callable[[EditRequest], EditOutcome]


@dataclass
class BenchSummary:
    results: Path | None  # None on ranks other than 0
    computed: int
    skipped: int
    failed: int
    missing: list[str]
    notices: list[str]
    seconds: float

    def __str__(self) -> str:
        where = f" -> {self.results}" if self.results else ""
        return (f"{self.computed} rows computed, {self.skipped} already done, {self.failed} failed "
                f"in {self.seconds:.1f} s{where}")


# ---------------------------------------------------------------- the default edit: spdinv.editing


class SpdinvEdit:
    """The default edit function: the library's `spdinv.editing.edits` with PIE-Bench's per-item
    settings (the blend words for engines that take them). The first job of an image x inversion
    runs `edits()` for every engine the run asks of it (`EditRequest.engines`), so the image is
    inverted once per method, with diagnostics; the next jobs take their engine's result. When that
    group fails (one engine's words, say), each engine runs alone, so an error stays its own row's."""

    def __init__(self) -> None:
        self.group: tuple | None = None  # what the held results were computed for
        self.results: dict[str, object] = {}  # engine -> EditResult of the group

    def __call__(self, request: EditRequest) -> EditOutcome:
        from ..images import to_pil

        group = (id(request.model), request.item.id, request.inversion, request.steps, request.seed,
                 request.diagnose, request.preset, tuple(request.engines))
        if group != self.group or request.engine not in self.results:
            self.group, self.results = group, {}
            engines = list(request.engines) if request.engine in request.engines else [request.engine]
            try:
                self.results = self._edits(request, engines)
            except SpdinvError:
                if engines == [request.engine]:
                    raise
                self.results = self._edits(request, [request.engine])
        result = self.results.pop(request.engine)
        inversion = result.inversion
        require_finite(inversion.trajectory, f"the {request.inversion} inversion")
        require_finite(result.edited, f"the {request.inversion} + {request.engine} edit")
        return EditOutcome(to_pil(result.edited)[0], inversion, inversion.seconds + result.timings["edit"],
                           result.network_calls_by["edit"])

    @staticmethod
    def _edits(request: EditRequest, engines: list[str]) -> dict[str, object]:
        """engine -> EditResult: one `edits()` call, the inversion computed once for all of them."""
        from ..editing import edits, split_fields

        options = {engine: engine_arguments(engine, request.engine_options, request.item) for engine in engines}
        per_engine, sampler = {}, {}
        for engine, arguments in options.items():
            engine_fields, sampler_fields, _ = split_fields(engine, None, arguments)
            per_engine[engine] = engine_fields
            sampler = sampler_fields  # the same for every engine (engine_arguments' sampler fields)
        results = edits(request.model, request.image, request.item.source_prompt, request.item.target_prompt,
                        [request.inversion], engines, num_steps=request.steps, seed=request.seed,
                        diagnose=request.diagnose, preset=request.preset,
                        inversion_options={request.inversion: method_arguments(request.inversion,
                                                                               request.inversion_options)},
                        engine_options=per_engine, sampler=sampler)
        return {result.engine: result for result in results}


def method_arguments(method: str, options: dict) -> dict:
    """The inversion options that apply to this method (the others are for other methods)."""
    from ..inversion import get_method

    fields = {f.name for f in dataclasses.fields(get_method(method).options)}
    return {k: v for k, v in options.items() if k in fields}


def engine_arguments(engine: str, options: dict, item: BenchItem | None = None) -> dict:
    """The options that apply to this engine or to the sampler, plus the item's blend words for an
    engine that takes them (unless given explicitly)."""
    from ..editing import SamplerOptions, get_engine

    fields = {f.name for f in dataclasses.fields(get_engine(engine).options)}
    fields |= {f.name for f in dataclasses.fields(SamplerOptions)}
    arguments = {k: v for k, v in options.items() if k in fields}
    if item is not None and item.blend_words and "blend" in fields and "blend" not in options:
        arguments["blend"] = item.blend_words
    return arguments


# ---------------------------------------------------------------- running


def plan_jobs(items: list[BenchItem], inversions: list[str], engines: list[str]) -> list[Job]:
    """The canonical order: dataset order, then --inversion order, then --engine order."""
    return [Job(item, inversion, engine) for item in items for inversion in inversions for engine in engines]


def run_benchmark(options: BenchOptions, edit_fn: EditFunction | None = None, model=None,
                  shard: Shard | None = None) -> BenchSummary:
    """Run (or resume) a benchmark; under torchrun every rank calls this and rank 0 merges."""
    start = time.perf_counter()
    shard = shard or current_shard()
    check_names(options)
    full = load_dataset(options.data)
    resolve_protocol(options, full)
    dataset = full.select(options.categories, options.limit)
    if not dataset.items:
        raise SpdinvError(f"no items to run in {options.data} (categories {options.categories}, limit {options.limit})")
    header = columns(options.metrics)
    options.out.mkdir(parents=True, exist_ok=True)
    check_settings(options, shard)
    jobs = plan_jobs(dataset.items, options.inversions, options.engines)
    done = finished_keys(options.out, header)
    owned = plan_jobs(shard.take(dataset.items), options.inversions, options.engines)
    mine = [job for job in owned if job.key not in done]
    say = _printer(shard)
    _report_missing(dataset, options.out, shard, say)
    clipped = dataset.clipped_masks_note()
    if clipped:
        say(f"note: {clipped}")

    with ProcessGroup(shard) as group:
        computed = failed = 0
        notices: list[str] = []
        if mine:
            evaluation = dataclasses.replace(options.evaluation, device=shard.device(options.device),
                                             structure_resize=options.structure_resize)
            evaluator = Evaluator(options.metrics, evaluation)
            notices = evaluator.notices
            for notice in notices:
                say(f"note: {notice}")
            if model is None:
                from ..model import load_model

                model = load_model(options.model, device=shard.device(options.device), dtype=options.dtype,
                                   variant=options.variant, config=options.config)
            computed, failed = _run_jobs(mine, model, evaluator, edit_fn or SpdinvEdit(), options, shard, header)
        group.barrier()  # every part file is complete
        own_rows = read_rows(part_path(options.out, shard.rank), header)
        # the rows travel too, for nodes that share no file system with rank 0
        gathered = group.gather((own_rows, computed, len(owned) - len(mine), failed)) or []
        results = None
        if shard.is_main:
            results = merge(options.out, header, [job.key for job in jobs], [r for g in gathered for r in g[0]])
        group.barrier()  # results.csv is durable: the part files can go
        _remove_parts(options.out, shard)
        group.barrier()  # every rank's part is gone: the folder is empty
        if shard.is_main and (options.out / "parts").is_dir() and not any((options.out / "parts").iterdir()):
            (options.out / "parts").rmdir()
    if shard.is_main:  # the totals over all ranks
        computed, skipped, failed = (sum(g[i] for g in gathered) for i in (1, 2, 3))
    else:
        skipped = len(owned) - len(mine)
    notices = notices + ([clipped] if clipped else [])
    return BenchSummary(results, computed, skipped, failed, dataset.missing, notices, time.perf_counter() - start)


def resolve_protocol(options: BenchOptions, dataset: BenchDataset) -> None:
    """Fill in the protocol (pie-bench for the real PIE-Bench, lossless for world exports) and the
    structure-distance resize (the protocol's) where they were not given."""
    from .metrics import STRUCTURE_RESIZES

    options.protocol = check_protocol(options.protocol or default_protocol(dataset.has_ground_truth))
    options.structure_resize = options.structure_resize or DEFAULT_STRUCTURE_RESIZE[options.protocol]
    if options.structure_resize not in STRUCTURE_RESIZES:
        raise SpdinvError(f"unknown structure resize {options.structure_resize!r}; valid: {', '.join(STRUCTURE_RESIZES)}")


def _run_jobs(jobs: list[Job], model, evaluator: Evaluator, edit_fn: EditFunction, options: BenchOptions,
              shard: Shard, header: list[str]) -> tuple[int, int]:
    writer = PartWriter(part_path(options.out, shard.rank), header)
    failed = 0
    try:
        bar = tqdm(jobs, desc=f"bench rank {shard.rank}" if shard.distributed else "bench", unit="edit",
                   position=shard.rank, disable=not options.progress, dynamic_ncols=True)
        groups: dict[tuple[str, str], list[str]] = {}  # (image, inversion) -> the engines asked of it
        for job in jobs:
            groups.setdefault((job.item.id, job.inversion), []).append(job.engine)
        for job in bar:
            bar.set_postfix_str(f"{job.item.id} {job.inversion}+{job.engine}", refresh=False)
            row = run_job(job, model, evaluator, edit_fn, options, tuple(groups[job.item.id, job.inversion]))
            failed += bool(row[ERROR_COLUMN])
            writer.append(row)
    finally:
        writer.close()
    return len(jobs), failed


def run_job(job: Job, model, evaluator: Evaluator, edit_fn: EditFunction, options: BenchOptions,
            engines: tuple[str, ...] = ()) -> dict[str, str]:
    """Edit one image with one inversion and engine, score it, save its side files; the row.
    `engines`: every engine the run asks of this image x inversion (`EditRequest.engines`).
    A one-line SpdinvError from reading the images or from the edit is recorded in the row's error
    column (the row counts as done: a resume does not retry it)."""
    item = job.item
    diagnose = options.save_diagnostics or bool({"noise_error", "reconstruction_error"} & set(options.metrics))
    row = {"id": item.id, "category": item.category, "inversion": job.inversion, "engine": job.engine,
           ERROR_COLUMN: ""}
    try:
        source = item.load_image()  # a damaged image is this row's error, not the run's
        target = item.load_target()
        model_input, _ = conform_image(source, model.image_size)
        request = EditRequest(model, model_input, item, job.inversion, job.engine, options.steps, options.seed,
                              options.inversion_options, options.engine_options, diagnose, options.preset, engines)
        torch.manual_seed(options.seed)  # each job starts from the same state, whichever rank runs it
        started = time.perf_counter()
        outcome = edit_fn(request)
    except SpdinvError as error:
        row[ERROR_COLUMN] = str(error).splitlines()[0] if str(error) else type(error).__name__
        row.update({m: "nan" for m in options.metrics})
        return row
    seconds = outcome.seconds if outcome.seconds is not None else time.perf_counter() - started
    sample, scored = scoring_sample(item, source, target, outcome.edited, options.protocol)
    sample.inversion, sample.edit_seconds = outcome.inversion, seconds
    sample.edit_calls = math.nan if outcome.edit_calls is None else outcome.edit_calls
    row.update({name: format_value(value) for name, value in evaluator.evaluate(sample).items()})
    _save_side_files(job, scored, outcome, options)
    return row


def scoring_sample(item: BenchItem, source: Image.Image, target: Image.Image | None, edited: Image.Image,
                   protocol: str) -> tuple[Sample, ScoredEdit]:
    """The Sample to score and the edit as scored. The model saw the source's centre square (see
    conform_image), so the source, mask and ground truth are cropped to that same square and the edit
    is brought to its size (a no-op for square images at the model's size); then the protocol applies."""
    box = centre_square(*source.size)
    side = box[2] - box[0]
    edited = edited.convert("RGB")
    if edited.size != (side, side):
        edited = edited.resize((side, side), Image.LANCZOS)
    scored = scored_edit(edited, protocol)
    if target is not None and target.size != source.size:
        target = target.resize(source.size, Image.LANCZOS)
    truth = item.ground_truth
    sample = Sample(source=source.crop(box), edited=scored.image, mask=item.mask()[box[1]:box[3], box[0]:box[2]],
                    target_prompt=item.target_prompt, target=target.crop(box) if target is not None else None,
                    target_scene=truth.target_scene if truth else None)
    return sample, scored


def _save_side_files(job: Job, scored: ScoredEdit, outcome: EditOutcome, options: BenchOptions) -> None:
    """Per-step inversion diagnostics (for the report's plots) and, if asked, the edit exactly as it
    was scored; written before the row, so a finished row always has them."""
    if options.save_diagnostics and hasattr(outcome.inversion, "diagnostics"):
        folder = options.out / "diagnostics"
        folder.mkdir(exist_ok=True)
        diagnostics = {"id": job.item.id, "inversion": job.inversion, "engine": job.engine,
                       **outcome.inversion.diagnostics()}
        write_json(folder / f"{job.name}.json", diagnostics, indent=None)
    if options.save_images:
        path = options.out / "images" / f"{job.inversion}+{job.engine}" / saved_name(job.item.image_path, options.protocol)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(scored.file_bytes())


# ---------------------------------------------------------------- checks and bookkeeping


def check_names(options: BenchOptions) -> None:
    """Methods, engines, metrics and options, checked before anything runs (every rank alike)."""
    from ..editing import check_pairs, preset_options
    from ..inversion import make_options

    check_pairs(options.inversions, options.engines, "give at least one --inversion and one --engine")
    options.metrics = parse_metrics(options.metrics)
    for key in options.inversion_options:
        if not any(key in method_arguments(m, options.inversion_options) for m in options.inversions):
            raise SpdinvError(f"inversion option {key} applies to none of {', '.join(options.inversions)}")
    for key in options.engine_options:
        if not any(key in engine_arguments(e, options.engine_options) for e in options.engines):
            raise SpdinvError(f"engine option {key} applies to none of {', '.join(options.engines)} nor the sampler")
    for method in options.inversions:  # values checked by the options dataclasses themselves
        make_options(method, **method_arguments(method, options.inversion_options))
    for engine in options.engines:
        arguments = engine_arguments(engine, options.engine_options)
        preset_options(options.preset, engine, arguments, None)  # the preset has this engine; values checked


def run_settings(options: BenchOptions) -> dict:
    return {
        "data": str(Path(options.data).resolve()),
        "model": options.model or "embedded shapes-world model",
        "dtype": options.dtype,
        "steps": options.steps,
        "seed": options.seed,
        "metrics": list(options.metrics),
        "inversion_options": options.inversion_options,
        "engine_options": options.engine_options,
        "preset": options.preset,
        "protocol": options.protocol,
        "structure_resize": options.structure_resize,
        "evaluator": evaluator_variants(options.protocol),
    }


def evaluator_variants(protocol: str | None) -> dict:
    """The fixed choices behind the numbers, recorded with every run (and shown by the report)."""
    return {"protocol": PROTOCOLS.get(protocol or "", ""), "ssim": SSIM_VARIANT,
            "lpips": "SqueezeNet 1.1 + LPIPS v0.1 linear layers, inputs in [-1, 1] (torchvision-free)",
            "clip_processor": clip_image_processor_class().__name__,
            "scored_region": "the centre square the model saw (non-square sources cropped, not stretched)"}


def machine() -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def command_line(shard: Shard) -> list[str]:
    """The command as typed: `spdinv ...`, or the torchrun/accelerate form under several processes."""
    program = Path(sys.argv[0]).name
    args = sys.argv[1:] if program in ("spdinv", "__main__.py") else sys.argv
    prefix = ["spdinv"] if program in ("spdinv", "__main__.py") else []
    if shard.distributed and prefix:
        prefix = ["torchrun", f"--nproc-per-node={shard.world_size}", "-m", "spdinv"]
    return prefix + list(args)


def check_settings(options: BenchOptions, shard: Shard) -> None:
    """A resumed run must match the settings of the rows it keeps; a new one records them."""
    path = options.out / SETTINGS_FILE
    settings = run_settings(options)
    recorded = recorded_settings(options.out, settings, IDENTITY_SETTINGS)
    if recorded is not None:
        command = command_line(shard)
        commands = recorded.get("commands", [recorded.get("command")])
        if command not in commands and (shard.is_main or not shard.distributed):
            # the same settings, other methods or engines (or a resume typed differently): remember it too
            recorded["commands"] = commands + [command]
            write_json(path, recorded)
        return
    if shard.is_main or not shard.distributed:
        record = {**settings, "command": command_line(shard), "world_size": shard.world_size, "machine": machine()}
        write_json(path, record)


def _report_missing(dataset: BenchDataset, out: Path, shard: Shard, say: Callable[[str], None]) -> None:
    if not dataset.missing:
        return
    if shard.is_main:
        write_atomically(out / "missing.txt", "\n".join(dataset.missing) + "\n")
    shown = ", ".join(dataset.missing[:10]) + (", ..." if len(dataset.missing) > 10 else "")
    say(f"note: skipped {len(dataset.missing)} id(s) whose image is missing ({shown}); listed in {out / 'missing.txt'}")


def _remove_parts(out: Path, shard: Shard) -> None:
    """Each rank removes its own part; rank 0 also those of ranks beyond this run's world size
    (left by an earlier, larger run and merged just now)."""
    paths = [part_path(out, shard.rank)]
    if shard.is_main:
        paths += [p for p in part_paths(out) if int(p.stem.split("-")[1]) >= shard.world_size]
    for path in paths:
        path.unlink(missing_ok=True)


def _printer(shard: Shard) -> Callable[[str], None]:
    def say(message: str) -> None:
        if shard.is_main:
            print(message, file=sys.stderr, flush=True)

    return say


__all__ = ["BenchOptions", "BenchSummary", "EditOutcome", "EditRequest", "Job", "run_benchmark", "run_job",
           "plan_jobs", "SpdinvEdit", "RESULTS_FILE"]
