"""The `chromoseg` command line: one subcommand per DVC stage, plus data, predict and bench tools.

Heavy imports (torch, mlflow) happen inside the commands so that `chromoseg --help` is fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from chromoseg.config import Params, load_params

try:  # recent typer parses with its own copy of click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import NoArgsIsHelpError, UsageError


@contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    """Click's usage errors (unknown option, a value of the wrong type or out of range) as one line."""
    try:
        yield
    except NoArgsIsHelpError:
        raise  # `chromoseg` / `chromoseg import` alone: the help text, as asked for
    except UsageError as exc:
        path = exc.ctx.command_path if exc.ctx is not None else "chromoseg"
        _setup_logging()  # the error can come before the app callback has run
        fail(f"{path}: {exc.format_message().rstrip('.')}; see `{path} --help`")


class _Group(TyperGroup):
    """The app's command group: every error, usage errors included, is one line with exit code 2."""

    def make_context(self, info_name, args, parent=None, **extra):  # type: ignore[no-untyped-def]
        with _one_line_usage_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):  # type: ignore[no-untyped-def]
        # Subcommands (and the `import` / `data` groups) parse their arguments in here.
        with _one_line_usage_errors():
            return super().invoke(ctx)


app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, cls=_Group)
import_app = typer.Typer(
    no_args_is_help=True,
    help="Import real data in Pommier's format (kaggle: data/raw/, labelme: data/real/).",
)
data_app = typer.Typer(no_args_is_help=True, help="Dataset tools.")
app.add_typer(import_app, name="import")
app.add_typer(data_app, name="data")

log = logging.getLogger("chromoseg")

ParamsOpt = Annotated[Path, typer.Option("--params", help="Parameter file (YAML).")]

for _var, _val in (
    ("NO_ALBUMENTATIONS_UPDATE", "1"),
    ("MLFLOW_DISABLE_TELEMETRY", "true"),
    ("DVC_NO_ANALYTICS", "1"),
    ("HF_HUB_OFFLINE", "1"),
    ("GIT_PYTHON_REFRESH", "quiet"),
):
    os.environ.setdefault(_var, _val)


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("urllib3", "alembic", "git", "matplotlib", "PIL", "h5py", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    _setup_logging(verbose)


def _params(path: Path) -> Params:
    return run_guarded(load_params, path)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Log a one-line error for the user and exit non-zero."""
    # Messages that quote other tools (a server's log, an MLflow error) can span lines.
    log.error("; ".join(line.strip() for line in message.splitlines() if line.strip()))
    raise typer.Exit(code)


def run_guarded(fn, *args, **kwargs):
    """Run `fn`, turning user errors into a one-line message and exit code 2.

    ValueError covers bad values (DataError and ConfigError are ValueErrors); OSError an output path
    that cannot be written. `--verbose` logs the traceback as well.
    """
    try:
        return fn(*args, **kwargs)
    except (ValueError, OSError) as exc:
        log.debug("traceback", exc_info=True)
        fail(_describe(exc))


def _describe(exc: Exception) -> str:
    # An OSError from the system names a path; the project's own FileNotFoundErrors carry a message.
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror}; check the path and its permissions"
    return str(exc)


def _output_file(path: Path | None, example: str) -> None:
    """Fail before any work when the --out file path is an existing folder."""
    if path is not None and path.is_dir():
        fail(f"--out {path} is a folder; give a file path such as {path / example}")


# Wall time of each stage's last run, for `chromoseg summary` (not a DVC output: timings vary).
STAGE_TIMES = Path(".chromoseg/stage_times.json")


def run_stage(name: str, fn, params: Params):
    """Run a pipeline stage under `run_guarded`; log its wall time and record it in STAGE_TIMES."""
    t0 = time.perf_counter()
    result = run_guarded(fn, params)
    seconds = round(time.perf_counter() - t0, 1)
    log.info("stage %s done in %.1f s", name, seconds)
    try:
        times = json.loads(STAGE_TIMES.read_text()) if STAGE_TIMES.is_file() else {}
    except (OSError, ValueError):
        times = {}
    times[name] = seconds
    from chromoseg.fsutil import write_json

    write_json(STAGE_TIMES, times)
    return result


@app.command()
def synth(
    params: ParamsOpt = Path("params.yaml"),
    n: Annotated[int | None, typer.Option(min=1, help="Number of images (default: synth.n_images).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output HDF5 (default: synth.out).")] = None,
) -> None:
    """Generate the default synthetic dataset in Pommier's HDF5 format (deterministic)."""
    from chromoseg.data.synth import synthesize_to_file

    p = _params(params)
    _output_file(out, "pairs.h5")
    run_guarded(synthesize_to_file, p.synth, out=out, n=n)


@app.command()
def prepare(params: ParamsOpt = Path("params.yaml")) -> None:
    """Stage 1: validate labels, combine classes, split into train/val/test."""
    from chromoseg.prepare import run_prepare

    run_stage("prepare", run_prepare, _params(params))


@app.command()
def train(params: ParamsOpt = Path("params.yaml")) -> None:
    """Stage 2: train the U-Net, log the run and the model to MLflow (data-parallel under torchrun).

    With finetune.data set: fine-tune finetune.init on that real set mixed with synthetic images.
    """
    from chromoseg.train import TrainingInterruptedError, run_train

    p = _params(params)
    if p.finetune.data:
        from chromoseg.finetune import run_finetune

        run_stage("train", run_finetune, p)
        return
    try:
        run_stage("train", run_train, p)
    except TrainingInterruptedError as exc:
        fail(str(exc), code=128 + exc.signum)


@app.command()
def evaluate(params: ParamsOpt = Path("params.yaml")) -> None:
    """Stage 3: score the trained model on the test split; metrics, plots, overlays."""
    from chromoseg.evaluate import run_evaluate

    run_stage("evaluate", run_evaluate, _params(params))


@app.command()
def register(params: ParamsOpt = Path("params.yaml")) -> None:
    """Stage 4: register the model and move the champion alias if it wins on the test split."""
    from chromoseg.registry import run_register

    run_stage("register", run_register, _params(params))


@app.command()
def bench(
    params: ParamsOpt = Path("params.yaml"),
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Few iterations (well under a minute).")] = False,
    preset: Annotated[
        str | None, typer.Option(help="Model size from chromoseg.bench.PRESETS instead of params' train.")
    ] = None,
    threads: Annotated[int, typer.Option(min=0, help="Intra-op threads (0: all cores).")] = 0,
    sweep: Annotated[
        str | None, typer.Option(help="Comma-separated presets: every precision/backend variant per size.")
    ] = None,
    backends: Annotated[
        bool, typer.Option("--backends", help="Check torch/onnx/compile outputs and speed against fp32.")
    ] = False,
    emulate_avx2: Annotated[
        bool, typer.Option("--emulate-avx2", help="Cap oneDNN/ATen at AVX2 (stand-in for AVX2-only CPUs).")
    ] = False,
    isolate: Annotated[
        bool, typer.Option(help="One subprocess per phase (exact peak RSS per phase); off: faster start.")
    ] = True,
) -> None:
    """CPU throughput: naive fp32 versus the auto plan (train and inference img/s, peak RSS)."""
    import json

    from chromoseg import bench as b

    try:
        if params.is_file():
            cfg, n_classes = b.default_config(str(params))
        else:
            log.info("%s not found: benchmarking TrainConfig() defaults", params)
            cfg, n_classes = b.TrainConfig(), 3
        if preset:
            cfg = b.preset(preset, cfg)
        if sweep:
            for name in sweep.split(","):
                b.preset(name)  # every name checked before the first (minutes-long) preset runs
            rows = b.sweep(tuple(sweep.split(",")), n_classes, quick=quick, threads=threads,
                           emulate_avx2=emulate_avx2)  # fmt: skip
            typer.echo(json.dumps(rows, indent=1) if as_json else b.format_sweep(rows))
            return
        if backends:
            b.machine_info(threads)
            res = b.check_backends(cfg, n_classes, repeats=1 if quick else 3)
            typer.echo(json.dumps(res, indent=1))
            return
        res = b.compare(
            cfg, n_classes, quick=quick, threads=threads, emulate_avx2=emulate_avx2, isolate=isolate
        )
    except (ValueError, RuntimeError) as exc:
        fail(str(exc))
    typer.echo(json.dumps(res, indent=1) if as_json else b.format_compare(res))


@app.command("evaluate-external")
def evaluate_external(
    labelme: Annotated[
        Path, typer.Option("--labelme", help="Folder of labelme JSON files (two polygons each).")
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model", help="models:/NAME@ALIAS, runs:/ID/model, a model folder or a model.pt file."
        ),
    ] = "models:/chromoseg-unet@champion",
    out: Annotated[
        Path, typer.Option("--out", help="Metrics JSON to write (same keys as eval.json).")
    ] = Path("metrics/eval_external.json"),
    width_from: Annotated[
        str,
        typer.Option(
            "--width-from",
            help="What sets each image's scale: 'image' (default: measured on the grey image, as "
            "predict and the served model do) or 'labels' (the polygons' width).",
        ),
    ] = "image",
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Score a model on real labelme-annotated images (rescaled to the 88x88 scale)."""
    from chromoseg.data.labelme import WIDTH_SOURCES
    from chromoseg.evaluate import run_evaluate_external

    if width_from not in WIDTH_SOURCES:
        fail(f"--width-from must be one of {', '.join(WIDTH_SOURCES)}, got {width_from!r}")
    _output_file(out, "eval_external.json")
    _point_mlflow(params)
    infer = _params(params).infer if params.is_file() else None
    m = run_guarded(run_evaluate_external, labelme, model, out, width_from, infer)
    typer.echo(json.dumps({k: m[k] for k in ("dice", "iou_overlap", "iou_chromosomes_pi") if k in m}))


@app.command()
def predict(
    images: Annotated[
        list[Path], typer.Argument(help="Image files (PNG/JPEG/TIFF) or labelme JSON files (embedded image).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder (labels PNG, overlay PNG, JSON).")] = Path(
        "predictions"
    ),
    model: Annotated[
        str | None,
        typer.Option(
            help="Model run in-process: models:/NAME@ALIAS, runs:/ID/PATH, a model folder or a "
            "model.pt file (default models:/chromoseg-unet@champion)."
        ),
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="A running scoring server instead, e.g. http://127.0.0.1:5001.")
    ] = None,
    scale: Annotated[
        str,
        typer.Option(
            help="'auto' (default): each image's chromosome width is measured and the image brought to "
            "the training scale; or a resize factor for every image (0.5 for images at twice the "
            "88x88 scale, 1 for LowRes-sized ones)."
        ),
    ] = "auto",
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Segment images: per image a label PNG, an A/B/overlap overlay and a JSON summary."""
    import json

    from chromoseg.predict import DEFAULT_MODEL, predict_files

    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; give a folder for the predictions")
    if url is not None and not url.startswith(("http://", "https://")):
        fail(f"--url {url!r} is not an http(s) URL; give the server's address, e.g. http://127.0.0.1:5001")
    infer = None
    if url is None:
        model = model or DEFAULT_MODEL
        _point_mlflow(params)
        infer = _params(params).infer if params.is_file() else None
    rows = run_guarded(predict_files, images, out, model=model, url=url, scale=scale, infer=infer)
    typer.echo(json.dumps(rows, indent=1))


def _point_mlflow(params: Path) -> None:
    """Use the project's tracking store (params.yaml) unless MLFLOW_TRACKING_URI is set."""
    if os.environ.get("MLFLOW_TRACKING_URI") or not params.is_file():
        return
    import mlflow

    from chromoseg.tracking import tracking_uri

    uri = tracking_uri(_params(params).mlflow)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


@app.command("bench-serve")
def bench_serve_cmd(
    model: Annotated[str, typer.Option(help="Model URI to serve.")] = "models:/chromoseg-unet@champion",
    n_single: Annotated[int, typer.Option(min=1, help="Timed single-image requests.")] = 50,
    n_batch: Annotated[int, typer.Option(min=1, help="Timed batch requests.")] = 10,
    batch: Annotated[int, typer.Option(min=1, help="Images per batch request.")] = 32,
    payload: Annotated[str, typer.Option(help="json (nested uint8 lists) or png (base64 strings).")] = "json",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Serving latency: start `mlflow models serve` on 127.0.0.1, time 1 and 32 x 88x88 requests, stop it."""
    import json

    from chromoseg import bench_serve as bs

    if not os.environ.get("MLFLOW_TRACKING_URI") and params.is_file():
        from chromoseg.tracking import tracking_uri

        # The server is a subprocess: it finds the registry through the environment.
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri(_params(params).mlflow)
    try:
        res = bs.bench_serve(model, n_single=n_single, n_batch=n_batch, batch=batch, payload=payload)
    except (ValueError, bs.ServerError) as exc:
        fail(str(exc))
    typer.echo(json.dumps(res, indent=1) if as_json else bs.format_table(res))


@app.command()
def summary(params: ParamsOpt = Path("params.yaml")) -> None:
    """Print the pipeline's headline figures (test dice, IoUs, registry verdict)."""
    p = _params(params)
    lines = []
    for label, path in (
        ("evaluate", p.evaluate.out),
        ("register", p.register.out),
        ("train", p.train.metrics),
    ):
        f = Path(path)
        if not f.is_file():
            fail(f"{f}: missing; run `dvc repro` first")
        lines.append((label, json.loads(f.read_text())))
    ev, reg, tr = (d for _, d in lines)
    mode = "combined (3 classes)" if ev["combine_label"] else "4 classes"
    n_views = ev.get("tta_views", 1)
    views = f", {n_views}-view test-time augmentation" if n_views > 1 else ""
    out = [
        f"chromoseg: {mode}, {ev['n_images']} test images{views}",
        f"  test dice (Ghosh 2017)      {ev['dice']:.4f}",
        f"  overlap IoU                 {ev['iou_overlap']:.4f}",
    ]
    for key, name in (("dice_pi", "dice, A/B PI"), ("dice_combined", "dice, A and B merged")):
        if key in ev:
            out.append(f"  {name:<28}{ev[key]:.4f}")
    if "iou_chromosomes_pi" in ev:
        out.append(f"  chromosomes IoU (A/B PI)    {ev['iou_chromosomes_pi']:.4f}")
    if "instances_connected" in ev:
        out.append(f"  A and B each one region     {ev['instances_connected']:.4f} of images")
    out += [
        "  per-class IoU               " + ", ".join(f"{k} {v:.4f}" for k, v in ev["iou_per_class"].items()),
        f"  training                    {tr['train_seconds']} s, best val dice {tr['best_val_dice']:.4f}"
        f" at epoch {tr['best_epoch'] + 1}, {tr['precision']}",
        f"  registry                    {reg['verdict']}",
    ]
    if STAGE_TIMES.is_file():
        times = json.loads(STAGE_TIMES.read_text())
        stages = ("prepare", "train", "evaluate", "register")
        out.append(
            "  stage wall times (last run)  "
            + ", ".join(f"{k} {times[k]:.0f} s" for k in stages if k in times)
        )
    typer.echo("\n".join(out))


@import_app.command("kaggle")
def import_kaggle_cmd(
    file: Annotated[Path, typer.Argument(help="Pommier's Kaggle HDF5 file (raw or cleaned layout).")],
    out: Annotated[Path | None, typer.Option(help="Output HDF5 (default: data/raw/<name>.h5).")] = None,
) -> None:
    """Import Pommier's Kaggle file into data/raw/ as `dataset_1` (atomic)."""
    from chromoseg.data.io import import_kaggle

    _output_file(out, "pairs.h5")
    path = run_guarded(import_kaggle, file, out)
    typer.echo(f"wrote {path}; next: dvc add {path.parent}")


@import_app.command("labelme")
def import_labelme_cmd(
    directory: Annotated[Path, typer.Argument(help="Folder of labelme *.json files (two polygons each).")],
    out: Annotated[
        Path | None, typer.Option(help="Output HDF5 (default: data/real/<dir>.h5, apart from data/raw).")
    ] = None,
    target_width: Annotated[
        float, typer.Option(help="Chromosome width in px after rescaling (the 88 x 88 scale).")
    ] = 11.5,
    set_params: Annotated[
        bool,
        typer.Option(help="Point finetune.data in params.yaml at the new set (only that line changes)."),
    ] = True,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Import labelme annotations as a real-image set for fine-tuning, at the 88 x 88 scale (atomic).

    Writes data/real/<dir>.h5 and its provenance JSON and sets finetune.data in params.yaml; then
    `dvc add data/real/<dir>.h5` versions the set and `dvc repro` fine-tunes on it.
    """
    from chromoseg.data.labelme import default_real_set_path, import_labelme
    from chromoseg.finetune import with_finetune_data
    from chromoseg.fsutil import atomic_path

    _output_file(out, "pairs.h5")
    path = out if out is not None else default_real_set_path(directory)
    edit = None
    if set_params and params.is_file():  # checked before anything is written
        edit = run_guarded(with_finetune_data, params.read_text(), str(path))
    path, prov = run_guarded(import_labelme, directory, out, target_width)
    typer.echo(f"wrote {path} (images and labels) and {prov} (source files, hashes, scales)")
    if edit is None:
        typer.echo(f"next: dvc add {path} && dvc exp run -S finetune.data={path}")
        return
    text, old = edit
    with atomic_path(params) as tmp:
        tmp.write_text(text)
    init = _params(params).finetune.init
    typer.echo(f"set finetune.data: {path} in {params} (was {old!r}); fine-tuning starts from {init}")
    typer.echo(f"next: dvc add {path}   (then `dvc repro` fine-tunes on it)")


@data_app.command("report")
def data_report_cmd(
    params: ParamsOpt = Path("params.yaml"),
    raw: Annotated[Path | None, typer.Option(help="Dataset HDF5 (default: prepare.raw).")] = None,
    real_dev: Annotated[
        Path | None, typer.Option("--real-dev", help="Folder of real labelme files to compare with.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder for the card and PNGs.")] = Path("reports"),
) -> None:
    """Dataset card: contact sheet, class frequencies, synthetic vs real-dev statistics."""
    from chromoseg.data.report import write_report

    if raw is None:
        raw = (
            Path(_params(params).prepare.raw)
            if params.is_file()
            else Path("data/raw/LowRes_13434_overlapping_pairs.h5")
        )
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; give a folder for the dataset card")
    card = run_guarded(write_report, raw, real_dev, out)
    typer.echo(f"wrote {card}")


if __name__ == "__main__":  # pragma: no cover
    app()
