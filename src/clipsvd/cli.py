"""Command line: argument parsing only; each subcommand calls one function of the package.

The workflow's rules call these subcommands, and a user can run the same by hand.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import timing
from .config import ADAPTER_METHODS, FEATURE_METHODS, METHODS, DemoConfig
from .errors import ClipsvdError

log = logging.getLogger("clipsvd")


class _OwnMessagesOnly(logging.Filter):
    """The console shows clipsvd's messages and other libraries' warnings and errors; the
    chatter of libraries at INFO and below (open_clip's `Parsing model identifier…`, MLflow's
    database set-up) goes to the log file only, marked DEBUG."""

    def __init__(self, console: bool):
        super().__init__()
        self.console = console

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == "clipsvd" or record.name.startswith("clipsvd.")
        if own or record.levelno >= logging.WARNING:
            return True
        if self.console:
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def _setup_logging(log_file: str | None) -> None:
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO)
    console.addFilter(_OwnMessagesOnly(console=True))
    handlers: list[logging.Handler] = [console]
    if log_file:
        try:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            to_file = logging.FileHandler(log_file, mode="w", encoding="utf-8")
        except OSError as exc:
            from .errors import OutputError

            raise OutputError(f"{log_file}: cannot write the log file ({exc.strerror}); make "
                              "its folder writable or give another --log", exc.errno) from None
        to_file.addFilter(_OwnMessagesOnly(console=False))
        handlers.append(to_file)
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("clipsvd").setLevel(logging.DEBUG)  # its DEBUG lines reach the file


def _config(args):
    from . import config

    return config.load(args.config)


def cmd_validate(args) -> None:
    from .errors import ConfigError, DataError, ModelError
    from .models import check_model_request

    cfg = _config(args)
    try:  # names and tags only: no weights are loaded or downloaded
        check_model_request(cfg.model.name, cfg.model.pretrained)
    except ModelError as exc:
        about_weights = "pretrained" in str(exc) or "checkpoint" in str(exc)
        key = "model.pretrained" if about_weights else "model.name"
        raise ConfigError(f"{args.config}: key '{key}': {exc}") from None
    from .data.sources import declaration_problems

    problems = []
    for dataset in cfg.datasets:
        if dataset.demo is not None and not Path(dataset.root).expanduser().is_dir():
            continue  # the workflow's demo_data job makes it
        problems += declaration_problems(dataset)
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        raise DataError(f"{args.config}: {len(problems)} problems in the datasets' "
                        "declarations, one a line:\n" + "\n".join(problems))
    print(f"{args.config}: valid study '{cfg.study}' (config hash {cfg.fingerprint()}); "
          f"the datasets' declarations match their files")


def cmd_demo_data(args) -> None:
    from .data.demo import generate_demo_dataset

    if args.config is None:  # a dataset to try a study on, such as config/studies/template.yaml
        if not args.out:
            raise ClipsvdError("demo-data: give --out DIR (or --config and --dataset)")
        with timing.measure("demo data"):
            generate_demo_dataset(Path(args.out), DemoConfig(per_class=args.per_class,
                                                             image_size=args.image_size,
                                                             seed=args.seed))
        return
    if not args.dataset:
        raise ClipsvdError("demo-data: --config needs --dataset NAME (a dataset with a 'demo' "
                           "section)")
    dataset = _config(args).dataset(args.dataset)
    if dataset.demo is None:
        raise ClipsvdError(f"{args.config}: dataset '{args.dataset}' has no 'demo' section; only "
                           "demo datasets are generated")
    with timing.measure("demo data"):
        generate_demo_dataset(Path(args.out or dataset.root), dataset.demo)


def cmd_prepare(args) -> None:
    from .data.prepare import prepare_dataset
    from .models import model_image_size

    cfg = _config(args)
    size = args.image_size or model_image_size(cfg.model.name, cfg.model.pretrained)
    prepare_dataset(cfg.dataset(args.dataset), Path(args.out), size, threads=args.threads)


def cmd_sample(args) -> None:
    from .data.sampling import sample_split, write_split
    from .data.store import PreparedStore

    dataset = _config(args).dataset(args.dataset)
    split = sample_split(PreparedStore.open(args.store), args.setting, args.shots, args.seed,
                         dataset.sampling)
    write_split(Path(args.out), split)


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


def cmd_adapt(args) -> None:
    from .train import adapt

    _set_threads(args.threads)
    from .devices import acquire_device

    cfg = _config(args)
    with acquire_device(cfg.device) as device:
        adapt(cfg, args.dataset, args.method, Path(args.split), Path(args.store),
              Path(args.run_dir), device=device)


def cmd_features(args) -> None:
    from .features import compute_features

    from .devices import acquire_device

    _set_threads(args.threads)
    cfg = _config(args)
    with acquire_device(cfg.device) as device:
        compute_features(cfg, Path(args.store), Path(args.out), device=device)


def cmd_evaluate(args) -> None:
    from .devices import acquire_device
    from .evaluate import evaluate
    from .tracking import mirror_run

    _set_threads(args.threads)
    cfg = _config(args)
    run_dir = Path(args.run_dir)
    features = Path(args.features) if args.features else None
    with acquire_device(cfg.device) as device:
        record = evaluate(cfg, args.dataset, args.method, Path(args.split), Path(args.store),
                          run_dir, features_path=features, device=device)
    extra = (Path(args.split), *sorted(run_dir.glob("*.log")))
    mirror_run(run_dir, record["tags"], cfg.tracking.uri, cfg.tracking.enabled, extra)


def cmd_interpret(args) -> None:
    from .devices import acquire_device
    from .interpret import interpret_run
    from .tracking import attach_artifacts

    _set_threads(args.threads)
    cfg = _config(args)
    settings = cfg.interpret
    run_dir = Path(args.run_dir)
    out_dir = run_dir / "interpret"
    with acquire_device(cfg.device) as device:
        interpret_run(cfg, run_dir, Path(args.split), Path(args.store), out_dir,
                      corpus_path=Path(settings.corpus) if settings.corpus else None,
                      span_layers=settings.span_layers, k=settings.k,
                      max_images=settings.max_images, device=device)
    attach_artifacts(run_dir, out_dir, cfg.tracking.enabled)


def cmd_sync(args) -> None:
    from .tracking import sync

    cfg = _config(args)
    sync(cfg.study, cfg.tracking.uri)


def cmd_ui(args) -> None:
    import subprocess

    from .tracking import tracking_uri

    cfg = _config(args)
    uri = tracking_uri(cfg.tracking.uri)
    if uri.startswith(("http://", "https://", "databricks")):
        raise ClipsvdError(f"{args.config}: key 'tracking.uri' is {uri}, a server already; open "
                           "its UI in the browser (clipsvd ui serves a database store)")
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise ClipsvdError(f"{uri.removeprefix('sqlite:///')}: no MLflow store yet; run the "
                           "study (snakemake ... --configfile " + str(args.config) + ") first")
    print(f"MLflow UI of study '{cfg.study}': http://{args.host}:{args.port}/ "
          "(Ctrl-C stops it)", flush=True)
    # This interpreter's MLflow: the one whose entry points include clipsvd's app.
    command = [sys.executable, "-m", "mlflow", "server", "--app-name", "clipsvd",
               "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port),
               "--workers", "1"]
    try:
        sys.exit(subprocess.call(command))
    except KeyboardInterrupt:
        sys.exit(0)


def cmd_report(args) -> None:
    from .report import build_report
    from .tracking import mirror_report

    cfg = _config(args)
    out_dir = Path(args.out_dir)
    with timing.measure("report"):
        build_report([Path(p) for p in args.runs], out_dir, cfg)
    if not args.no_mlflow:
        mirror_report(cfg.study, out_dir, cfg.tracking.uri, cfg.tracking.enabled)


def cmd_pretrain(args) -> None:
    from .pretrain import pretrain

    pretrain(Path(args.recipe), Path(args.data) if args.data else None, Path(args.out),
             stop_after=args.stop_after)


def cmd_select(args) -> None:
    from .selection import select

    select([Path(p) for p in args.runs], Path(args.out) if args.out else None)


def cmd_vocabulary(args) -> None:
    from .pretrain import write_tokenizer

    write_tokenizer(Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="clipsvd", description="Few-shot adaptation of CLIP-style models to medical images "
        "(CLIP-SVD and baselines); the workflow's rules call these subcommands.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")

    def add(name, func, help_text, run_step=False, config_required=True):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", required=config_required, metavar="YAML",
                       help="the study config: a YAML file such as config/config.yaml, or the "
                            "resolved results/studies/<study>.json the workflow writes")
        p.add_argument("--log", metavar="FILE",
                       help="also write the log to this file (with third-party messages at "
                            "DEBUG level, which the console leaves out)")
        p.set_defaults(func=func)
        if run_step:  # a step on one run: its split, the prepared store, the run folder
            p.add_argument("--split", required=True, metavar="JSON",
                           help="the run's split file (results/splits/<dataset>/<setting>/"
                                "shots<K>_seed<s>.json, from `clipsvd sample`)")
            p.add_argument("--store", required=True, metavar="DIR",
                           help="the dataset's prepared store (results/prepared/<dataset>, "
                                "from `clipsvd prepare`)")
            p.add_argument("--run-dir", required=True, metavar="DIR",
                           help="the run folder (results/runs/<study>/<dataset>/<method>/"
                                "<setting>/shots<K>/seed<s>)")
            add_threads(p)
        return p

    def add_threads(p):
        p.add_argument("--threads", type=int, default=1, metavar="N",
                       help="CPU threads for PyTorch and image reading (default: 1)")

    def add_dataset(p, required=True):
        p.add_argument("--dataset", required=required, metavar="NAME",
                       help="a dataset name from the study config's datasets")

    add("validate", cmd_validate, "check a study config and print its hash")
    p = add("demo-data", cmd_demo_data, "generate the offline demo dataset: images of 4 classes "
            "as PNG, DICOM and NIfTI files with a CSV manifest (path, label, group)",
            config_required=False)
    add_dataset(p, required=False)
    p.add_argument("--out", metavar="DIR",
                   help="where to write it (default: the dataset's root); needed without "
                        "--config")
    p.add_argument("--per-class", type=int, default=DemoConfig.per_class, metavar="N",
                   help=f"images per class without --config (default: {DemoConfig.per_class})")
    p.add_argument("--image-size", type=int, default=DemoConfig.image_size, metavar="PX",
                   help=f"image side without --config (default: {DemoConfig.image_size})")
    p.add_argument("--seed", type=int, default=DemoConfig.seed, metavar="S",
                   help=f"random seed without --config (default: {DemoConfig.seed})")
    p = add("prepare", cmd_prepare, "read a dataset through MONAI into a prepared store")
    add_dataset(p)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the prepared store to write (results/prepared/<dataset>)")
    add_threads(p)
    p.add_argument("--image-size", type=int, metavar="PX",
                   help="side of the stored square images (default: the model's input size)")
    p = add("sample", cmd_sample, "draw a few-shot split file")
    add_dataset(p)
    p.add_argument("--store", required=True, metavar="DIR",
                   help="the dataset's prepared store (from `clipsvd prepare`)")
    p.add_argument("--setting", required=True, choices=["few_shot", "base_to_novel"],
                   help="few_shot: all classes; base_to_novel: train on the first half of the "
                        "classes, test on both halves")
    p.add_argument("--shots", type=int, required=True, metavar="K",
                   help="training images per class (K)")
    p.add_argument("--seed", type=int, required=True, metavar="S",
                   help="the seed the support sets are drawn with")
    p.add_argument("--out", required=True, metavar="JSON", help="the split file to write")
    p = add("features", cmd_features, "frozen image features of a prepared store")
    p.add_argument("--store", required=True, metavar="DIR",
                   help="the dataset's prepared store (from `clipsvd prepare`)")
    p.add_argument("--out", required=True, metavar="NPY",
                   help="the feature array to write (results/features/<dataset>/<model>.npy)")
    add_threads(p)
    p = add("adapt", cmd_adapt, "train an adapter (CLIP-SVD, CLIP-LoRA, Comp-LoRA) on one split",
            run_step=True)
    add_dataset(p)
    p.add_argument("--method", required=True, choices=list(ADAPTER_METHODS),
                   help="the adaptation method")
    p = add("evaluate", cmd_evaluate, "evaluate a run on its test set and log it to MLflow",
            run_step=True)
    add_dataset(p)
    p.add_argument("--method", required=True, choices=list(METHODS),
                   help="the method of the run (adapter methods read the run folder's "
                        "adapter.safetensors)")
    p.add_argument("--features", metavar="NPY",
                   help="frozen image features of the store (the methods fitted on them: "
                        f"{', '.join(FEATURE_METHODS)})")
    add("interpret", cmd_interpret, "which singular values of a CLIP-SVD run moved, and what "
        "its most changed heads mean in words", run_step=True)
    add("sync", cmd_sync, "log every run folder of the study that MLflow lacks")
    p = add("ui", cmd_ui, "serve the study's MLflow store in MLflow's UI, opening on the runs "
            "view (method, K, accuracy in %)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: "
                   "127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    p = add("report", cmd_report, "tables, figures, statistics and an HTML page of a study's "
                                  "runs, logged to MLflow")
    p.add_argument("--out-dir", required=True, metavar="DIR",
                   help="the report folder to write (results/report/<study>)")
    p.add_argument("--no-mlflow", action="store_true",
                   help="do not log the report folder to MLflow")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folders (each holding metrics.json, predictions.csv, run.json)")
    p = sub.add_parser("select", help="choose each method's learning rate by validation "
                       "accuracy over the runs of a grid (one study per rate)")
    p.add_argument("runs", nargs="+", metavar="DIR",
                   help="the grid studies' run folders (results/runs/<study>)")
    p.add_argument("--out", metavar="MD", help="also write the table to this Markdown file")
    p.add_argument("--log", help="also write the log to this file")
    p.set_defaults(func=cmd_select)
    # Not steps of a study: how the packaged miniature model was made (docs/miniature.md).
    p = sub.add_parser("pretrain", help="pretrain the miniature CLIP contrastively from a recipe")
    p.add_argument("--recipe", required=True,
                   help="e.g. src/clipsvd/pretrained/mini-clip-medmnist.yaml")
    p.add_argument("--data", help="the folder of the recipe's MedMNIST files")
    p.add_argument("--out", required=True, help="the weights (.safetensors); a record of the "
                   "run goes next to it as .json")
    p.add_argument("--stop-after", type=int, help="stop after this many steps of the recipe "
                   "(its schedule unchanged), e.g. to compare with its check fingerprints")
    p.add_argument("--log", help="also write the log to this file")
    p.set_defaults(func=cmd_pretrain)
    p = sub.add_parser("vocabulary", help="write the miniature's tokenizer (from its captions, "
                       "the interpretation corpus and the MedMNIST label names)")
    p.add_argument("--out", required=True, help="e.g. src/clipsvd/resources/mini-clip-tokenizer")
    p.add_argument("--log", help="also write the log to this file")
    p.set_defaults(func=cmd_vocabulary)
    return parser


def main(argv: list[str] | None = None) -> int:
    timing.begin_job()
    args = build_parser().parse_args(argv)
    # MLflow's loggers then go through the handlers below instead of its own stderr handler.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    try:
        _setup_logging(args.log)
        args.func(args)
        log.debug("clipsvd %s: %s", args.command, timing.summary())
    except ClipsvdError as exc:
        message = f"clipsvd {args.command}: error: {exc}"
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler) and handler.stream is not None:
                handler.stream.write(message + "\n")
                handler.flush()
        print(message, file=sys.stderr)
        return 2
    return 0
