"""One run from a composed config: resolve `init_from`, build the plain objects (each `_target_` logged), fit; or,
for task=export, write the init_from model as a Hugging Face model dir; for task=lm_eval, score it with lm-eval.

run.py calls `run` from its Hydra job; with `trainer.nproc_per_node` > 1, `run` starts that many workers, each of
which calls `train` (this module's function, imported by name) with the resolved config as a plain dict. This
is the one module of `llm` that reads a Hydra config; everything it builds takes plain arguments. Importing it
registers the OmegaConf resolvers conf/hydra/default.yaml uses (run.py, and SLURM tasks that unpickle run.py's
task function, import it).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from loguru import logger
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from llm.data.cache import check_cache_dirs
from llm.data.tokenizer import load_pretrained
from llm.errors import ConfigError, LLMError, check_int, check_number, check_seed
from llm.failures import explain, too_big_model
from llm.eval.sweep import ERROR_FILE
from llm.data.chat import reserved_chat_template
from llm.hf import (fetch_hub_model, is_hf_model_dir, load_hf, load_hf_tokenizer, load_hf_weights, looks_like_hub_name,
                    read_hf_config, save_hf)
from llm.hf import harness
from llm.model import gpt_config
from llm.train import rundir
from llm.train.checkpoint import (ARCH_KEYS, check_compatible, list_checkpoints, load_checkpoint_model,
                                  load_model_weights, read_json, resolve_checkpoint)
from llm.train.cluster import (Interrupted, Preempted, StopSignals, env_rank, launch, main_process_first,
                               process_group, stop_exception)
from llm.train.pruning import TrialPruner, default_storage
from llm.train.trainer import RunInfo, Trainer, split_batch
from llm.utils import git_commit, seed_everything


def build(node: DictConfig, what: str, **kwargs):
    """instantiate() one `_target_`, logging it; errors a user caused come out as our own one-line errors."""
    logger.info(f"instantiating {what}: {node._target_}")
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except Exception as e:
        cause = e
        while cause is not None and not isinstance(cause, LLMError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        known = too_big_model(e.__cause__ or e, {**node, **kwargs}) if what == "model" else explain(e.__cause__ or e)
        if known is not None:  # a library's or the machine's error (llm.failures): one line naming what
            raise known from e
        if isinstance(e.__cause__, TypeError) or isinstance(e, OmegaConfBaseException):
            raise ConfigError(f"{what} ({node._target_}): {str(e.__cause__ or e).splitlines()[0]}") from e
        raise


def resolve_init_from(cfg: DictConfig, explicit: set[str]) -> DictConfig:
    """init_from resolved to one checkpoint dir (or a Hugging Face model dir), and the model keys not set on the
    command line (`explicit`: the keys of the command-line overrides) taken from its config. The RoPE scaling of
    an HF model (and of a checkpoint that task=export writes out) is the model's own unless extrapolation is set."""
    need = cfg.task.get("requires_init_from")  # true: an error without init_from; warn: a warning (SFT)
    if need == "warn" and not cfg.init_from and not cfg.task.get("allow_scratch"):
        logger.warning(f"task={cfg.task.name} without init_from trains from RANDOM weights, not from a pretrained "
                       f"model: pass init_from=<run or checkpoint dir> (or init_from=latest:pretrain, or a Hugging "
                       f"Face model), or set task.allow_scratch=true if this is on purpose (no warning)")
    elif need and not cfg.init_from and not cfg.task.get("allow_scratch"):
        raise ConfigError(f"task={cfg.task.name} starts from a trained model: set init_from=<run or checkpoint dir> "
                          f"(or init_from=latest:<task>), or task.allow_scratch=true to start from random weights")
    if not cfg.init_from:
        return cfg
    if looks_like_hub_name(cfg.init_from):  # owner/name: a model on the Hugging Face hub
        with open_dict(cfg):
            cfg.init_from = str(fetch_hub_model(cfg.init_from))
    hf_dir = not str(cfg.init_from).startswith(("latest:", "best:")) and is_hf_model_dir(Path(str(cfg.init_from)).expanduser())
    if hf_dir:
        init_ckpt = Path(str(cfg.init_from)).expanduser().absolute()
        saved = read_hf_config(init_ckpt)
        load_hf_tokenizer(init_ckpt, saved["vocab_size"])  # a tokenizer that does not fit fails before any work
    else:
        init_ckpt = resolve_checkpoint(cfg.init_from, "init_from")
        saved = read_json(init_ckpt, "model_config.json")
    with open_dict(cfg):  # the checkpoint's architecture, except model keys set on the command line
        for key in (*ARCH_KEYS, "max_seq_len", "rope_theta"):
            if key in saved and key in cfg.model and "model" not in explicit and f"model.{key}" not in explicit:
                cfg.model[key] = saved[key]  # before anything interpolates ${model.*}
        if "model.max_seq_len" not in explicit and saved.get("pos_emb") == "rope":
            cfg.model.max_seq_len = max(cfg.model.max_seq_len, cfg.trainer.seq_len)  # a longer-context fine-tune
        exports = cfg.task.name in ("export", "lm_eval")
        if (hf_dir or exports) and not any(k.split(".")[0] == "extrapolation" for k in explicit):
            cfg.extrapolation = saved.get("rope_scaling") or {"type": "none"}
        cfg.init_from = str(init_ckpt)
    return cfg


def run(cfg: DictConfig, hydra: DictConfig) -> dict:
    """The Hydra job (`hydra`: its Hydra config): resolve init_from against the command-line overrides, then train
    here or in trainer.nproc_per_node worker processes (they get the resolved config, not Hydra: a -m sweep runs
    each job as its own process group). A sweep job run again by the same command continues where it stopped; an
    Optuna trial (`+trial=<n>`) learns where its study is. From here a stop signal or Ctrl-C ends the run at the
    next check (llm.train.cluster.StopSignals), saving a checkpoint once there is one to save."""
    stop = StopSignals()
    with stop.installed():
        try:
            return _run(cfg, hydra, stop)
        except LLMError:
            if stop.received:  # e.g. the tokenizer processes ended by the same signal: the signal is why
                raise stop.stopped("stopped before anything could be saved") from None
            raise


def _run(cfg: DictConfig, hydra: DictConfig, stop: StopSignals) -> dict:
    run_dir, overrides = Path(hydra.runtime.output_dir), [str(o) for o in hydra.overrides.task]
    if hydra.mode == RunMode.MULTIRUN:
        finished = continue_sweep_job(cfg, run_dir, overrides)
        if finished is not None:
            return finished
    explicit = {o.split("=")[0].lstrip("+~") for o in overrides}
    rescaled = any(k.split(".")[0] == "extrapolation" for k in explicit)
    lm_eval_version = harness.require_lm_eval() if cfg.task.name == "lm_eval" else None  # before any work
    cfg = resolve_init_from(cfg, explicit)
    stop.check("after resolving init_from")
    if cfg.task.name == "export":
        return export(cfg, run_dir)
    if cfg.task.name == "lm_eval":
        return lm_eval(cfg, run_dir, lm_eval_version, rescaled)
    if cfg.get("trial") is not None:
        sweeper = hydra.get("sweeper") or {}
        with open_dict(cfg):
            cfg.trial = {"number": int(cfg.trial), "study_name": sweeper.get("study_name") or "sweep",
                         "storage": sweeper.get("storage") or default_storage(hydra.sweep.dir),
                         "metric": cfg.get("optimized_metric") or "val_loss",
                         **{k: sweeper[k] for k in ("pruner", "n_startup_trials", "n_warmup_steps") if k in sweeper}}
    nproc = check_int("trainer.nproc_per_node", cfg.trainer.get("nproc_per_node") or 1, 1)
    if nproc > 1:
        validate(cfg)  # here, once, before any worker starts (the batch split over the ranks too)
        split_batch(cfg.trainer.batch_size, cfg.trainer.get("micro_batch_size"), nproc)
        return launch(train, nproc, OmegaConf.to_container(cfg, resolve=True), str(run_dir),
                      reraise=(Interrupted, Preempted), on_signal=stop_exception)
    return train(cfg, run_dir, stop)


def continue_sweep_job(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict | None:
    """A sweep job's dir from an earlier attempt of the same sweep: its results when it finished (the job is
    skipped), else `resume=auto` when it saved a checkpoint (it was interrupted); a job that failed starts again."""
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
    results_file = run_dir / "results.json"
    if results_file.is_file():
        results = json.loads(results_file.read_text())
        if results.get("overrides", list(overrides)) != list(overrides):
            raise ConfigError(f"{run_dir} holds a finished run of other overrides ({' '.join(results['overrides'])});"
                              f" use a new hydra.sweep.dir")
        logger.info(f"sweep job already finished ({results_file}): skipped")
        return results
    if not cfg.resume and list_checkpoints(run_dir):  # none usable: resume=auto refuses (the job is marked failed)
        logger.info("sweep job was interrupted: resume=auto")
        with open_dict(cfg):
            cfg.resume = "auto"
    elif not cfg.resume and rundir.artefacts(run_dir):  # an attempt that failed before its first checkpoint
        logger.info("sweep job failed before: started over (overwrite=true)")
        with open_dict(cfg):
            cfg.overwrite = True
    return None


def record_failure(run_dir: Path, error: BaseException) -> None:
    """A failed sweep job's one-line error, in its dir, for the sweep summary (the sweep goes on)."""
    Path(run_dir, ERROR_FILE).write_text(f"{type(error).__name__}: {error}".splitlines()[0] + "\n")


def train(cfg: DictConfig | dict, run_dir: str | Path, stop: StopSignals | None = None) -> dict:
    """Build everything from a resolved config and train, in this process's group (one process, one rank of
    torchrun / SLURM, or one worker of `launch`). `stop`: the job's stop signals (a worker catches its own)."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    stop = stop or StopSignals()
    with process_group(cfg.trainer.get("device", "auto")), stop.installed():
        return _train(cfg, Path(run_dir), stop)


# Keys of the data, tokenizer and post-training groups that count something (the least value allowed; null passes:
# a default derived later), and the fractions: checked in every group before any work, with the rest of `validate`.
COUNT_KEYS = {"max_bytes": 1, "max_documents": 1, "num_examples": 1, "eval_samples": 0, "num_proc": 1,
              "min_frequency": 1, "max_train_bytes": 1, "offset": 0, "split_seed": 0, "seq_len": 1, "windows": 1,
              "passkey_trials": 1, "batch_size": 1, "shard_tokens": 1, "max_tokens": 1, "epochs": 1}
FRACTION_KEYS = ("val_fraction",)


def _check_tree(prefix: str, node) -> None:
    """Walk a plain config subtree: no NaN or Inf anywhere; counts are integers, fractions in [0, 1)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        name = f"{prefix}.{key}" if isinstance(key, str) else f"{prefix}[{key}]"
        if isinstance(value, (dict, list)):
            _check_tree(name, value)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}={value!r} must be a finite number")
        elif key in COUNT_KEYS:
            check_seed(name, value) if key.endswith("seed") else check_int(name, value, COUNT_KEYS[key], allow_none=True)
        elif key in FRACTION_KEYS:
            check_number(name, value, 0, 1, high_open=True)


def validate(cfg: DictConfig) -> dict:
    """Every key checked before any work (no tokenizer trained, no data read, no model allocated): the seed, the
    trainer settings, the optimizer, the objective, the loggers, the model and extrapolation keys (a GPTConfig,
    no weights), and the counts and fractions of the data groups. Returns the cheap objects built on the way
    (`settings`, `optim`, `objective`, `loggers`); raises ConfigError naming the first bad key."""
    check_seed("seed", cfg.seed)
    if not isinstance(cfg.get("overwrite", False), bool):
        raise ConfigError(f"overwrite={cfg.overwrite!r} must be true or false")
    plain = OmegaConf.to_container(cfg, resolve=True)
    # the groups whose keys the data groups interpolate (task.data.seq_len: ${trainer.seq_len}) come first, so an
    # error names the key the user typed
    built = {"settings": build(cfg.trainer, "trainer"), "optim": build(cfg.optim, "optimizer"),
             "objective": build(cfg.task.objective, "objective")}
    built["loggers"] = [build(node, f"logger {name}") for name, node in (cfg.get("logger") or {}).items() if node]
    model_keys = {k: v for k, v in plain["model"].items() if k != "_target_"}
    gpt_config(**{"vocab_size": 1, **model_keys, "rope_scaling": plain.get("extrapolation")})
    for group in ("data", "tokenizer", "post_data"):
        _check_tree(group, plain.get(group) or {})
    _check_tree("task.data", plain["task"].get("data") or {})
    check_cache_dirs(plain)
    return built


def _train(cfg: DictConfig, run_dir: Path, stop: StopSignals) -> dict:
    cheap = validate(cfg)  # before the tokenizer and the data, which may take minutes
    seed_everything(cfg.seed)
    init_ckpt = Path(cfg.init_from) if cfg.init_from else None
    hf_dir = init_ckpt is not None and is_hf_model_dir(init_ckpt)
    saved = None
    if init_ckpt is not None:
        saved = read_hf_config(init_ckpt) if hf_dir else read_json(init_ckpt, "model_config.json")
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    if init_ckpt is not None:  # the earlier run's tokenizer, so token ids mean the same
        logger.info(f"init_from: {init_ckpt}" + (" (a Hugging Face model dir)" if hf_dir else ""))
        tokenizer = (load_hf_tokenizer(init_ckpt, saved["vocab_size"]) if hf_dir
                     else load_pretrained(str(init_ckpt / "tokenizer")))
    else:
        with main_process_first():  # rank 0 trains and caches a tokenizer; the other ranks reuse it
            tokenizer = build(cfg.tokenizer, "tokenizer")
    stop.check("after building the tokenizer")
    data = build(cfg.task.data, "data", tokenizer=tokenizer)  # may add chat tokens to the tokenizer
    rope_scaling = OmegaConf.to_container(cfg.extrapolation, resolve=True) if cfg.get("extrapolation") else None
    if saved is not None:  # keys the model presets do not carry (an imported model's untied head, norm eps, ...)
        extra = {k: saved[k] for k in ("norm_eps", "pad_vocab_to", "tie_embeddings", "init_std")
                 if k in saved and k not in cfg.model}
        model = build(cfg.model, "model", vocab_size=saved["vocab_size"], rope_scaling=rope_scaling, **extra)
        check_compatible(saved, model.config.to_dict(), "init_from", init_ckpt)
        (load_hf_weights if hf_dir else load_model_weights)(init_ckpt, model)
        if len(tokenizer) > model.config.vocab_size:
            logger.info(f"model: vocabulary grown from {model.config.vocab_size} to {len(tokenizer)} tokens")
            model.resize_vocab(len(tokenizer))
    else:
        model = build(cfg.model, "model", vocab_size=len(tokenizer), rope_scaling=rope_scaling)
    logger.info(f"model: {model.num_params():,} parameters")
    stop.check("after building the model")
    objective, optim, loggers, settings = cheap["objective"], cheap["optim"], cheap["loggers"], cheap["settings"]
    early_stop = TrialPruner(**cfg.trial) if cfg.get("trial") and env_rank() == 0 else None  # a sweep trial
    run_info = RunInfo(run_dir=str(run_dir), task=cfg.task.name, seed=cfg.seed, resume=cfg.resume, config=plain_cfg,
                       overwrite=bool(cfg.get("overwrite")), fingerprint=run_fingerprint(plain_cfg, tokenizer),
                       overrides=tuple(read_overrides(run_dir)), git_commit=git_commit(Path(__file__).parent))
    return Trainer(model, data, objective, optim, settings, run_info, tokenizer=tokenizer, loggers=loggers,
                   early_stop=early_stop, stop=stop).fit()


def read_overrides(run_dir: Path) -> list[str]:
    """The command line's overrides of a run, as Hydra recorded them in `<run dir>/.hydra/overrides.yaml`."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    return [str(o) for o in yaml.safe_load(path.read_text()) or []] if path.is_file() else []


def export(cfg: DictConfig, run_dir: Path) -> dict:
    """task=export: the init_from model (its RoPE scaling, or extrapolation=... when set) as a Hugging Face model
    dir, by default `hf/` in this run's dir; results.json says what was written."""
    init = Path(cfg.init_from)
    rope_scaling = OmegaConf.to_container(cfg.extrapolation, resolve=True)
    load = load_hf if is_hf_model_dir(init) else load_checkpoint_model
    model, tokenizer = load(init, rope_scaling)
    out_dir = Path(str(cfg.task.out_dir)).expanduser() if cfg.task.get("out_dir") else run_dir / "hf"
    written = save_hf(model, tokenizer, out_dir, cfg.task.get("dtype"))
    results = {"task": "export", "init_from": str(init), **written}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    logger.info(f"exported {written['architecture']} ({written['params']:,} parameters, {written['dtype']}) to "
                f"{written['out_dir']}: load it with transformers.AutoModelForCausalLM.from_pretrained(dir)")
    return results


def lm_eval(cfg: DictConfig, run_dir: Path, version: str, rescaled: bool = False) -> dict:
    """task=lm_eval: lm-eval's scores of the init_from model on task.tasks. An HF model dir is scored as it is
    (unless extrapolation=... rescales it); a run or checkpoint is exported to `hf/` in this run's dir first, as
    task=export does. Our tasks' files go to `lm_eval/`, lm-eval's per-example records to `lm_eval/samples/`.
    Everything is checked (names, settings, rows, chat template) before anything is written."""
    start, t = time.time(), cfg.task
    names = harness.check_task_names(OmegaConf.to_container(t.tasks) if OmegaConf.is_list(t.tasks) else t.tasks)
    device = harness.check_settings(names, t.limit, t.num_fewshot, t.batch_size, t.max_new_tokens, t.device)
    manager = harness.task_manager(names)
    init, ours = Path(cfg.init_from), [n for n in names if n in harness.OUR_TASKS]
    reuse = is_hf_model_dir(init) and not rescaled
    model = None
    if reuse:
        tokenizer = load_pretrained(str(init))
    else:
        load = load_hf if is_hf_model_dir(init) else load_checkpoint_model
        model, tokenizer = load(init, OmegaConf.to_container(cfg.extrapolation, resolve=True))
        reserved_chat_template(tokenizer)  # as save_hf does: the export's tokenizer
    examples = []
    if ours and t.get("rows") is None:
        raise ConfigError(f"task.rows is null (post_data.val): {', '.join(ours)} are made of held-out rows; set "
                          f"post_data.val (or task.rows), or name only lm-eval's tasks in task.tasks")
    if ours:
        rows = build(t.rows, "held-out rows")
        logger.info(f"lm_eval: {', '.join(ours)} from {rows.describe()}")
        examples = harness.held_out_examples(rows.rows(), tokenizer, str(init))
    if reuse:
        model_dir = init
    else:
        model_dir = Path(save_hf(model, tokenizer, run_dir / "hf", t.get("dtype"))["out_dir"])
        logger.info(f"lm_eval: exported {init} to {model_dir}")
    task_dir = run_dir / "lm_eval"
    counts = harness.write_tasks(task_dir, examples, tokenizer, ours, t.max_new_tokens) if ours else {}
    logger.info(f"lm_eval {version}: {', '.join(names)} on {model_dir} ({device}, limit {t.limit})")
    scores, samples = harness.run_lm_eval(model_dir, harness.task_specs(names, task_dir), manager, t.limit,
                                          t.batch_size, device, t.num_fewshot, cfg.seed)
    harness.write_samples(task_dir / "samples", samples)
    shutil.rmtree(task_dir / harness.DATASETS_CACHE, ignore_errors=True)  # a copy of our JSONL files
    results = {"task": "lm_eval", "init_from": str(init), "model_dir": str(model_dir), "exported": not reuse,
               "lm_eval_version": version, "tasks": names, "limit": t.limit, "num_fewshot": t.num_fewshot,
               "examples": counts, **scores, "wall_seconds": round(time.time() - start, 2),
               "overrides": read_overrides(run_dir), "git_commit": git_commit(Path(__file__).parent)}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    for key, value in scores.items():
        logger.info(f"{key} = {value}")
    return results


def claim_run_dir(cfg: DictConfig, run_dir: Path, in_sweep: bool = False) -> rundir.RunDirLock | None:
    """The run dir's lock for this Hydra job (rank 0 only: the ranks of torchrun / srun share the dir), after
    checking that this run may write there (see llm.train.rundir; a sweep job's dir from an earlier attempt of
    the same sweep is its own: `continue_sweep_job` decides). None on the other ranks."""
    if env_rank() != 0:
        return None
    if in_sweep:
        return rundir.RunDirLock(run_dir).acquire()
    return rundir.claim(run_dir, cfg.get("resume"), bool(cfg.get("overwrite")))


def run_fingerprint(plain_cfg: dict, tokenizer) -> dict:
    """What a resumed run must share with its checkpoint to continue it exactly: seed, data, tokenizer (a digest of
    its vocabulary), batch and sequence length. Saved in every checkpoint; `resume` compares."""
    data = {k: v for k, v in plain_cfg["task"]["data"].items() if k not in ("cache_dir", "num_proc")}
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {"seed": plain_cfg["seed"], "trainer.batch_size": plain_cfg["trainer"]["batch_size"],
            "trainer.seq_len": plain_cfg["trainer"]["seq_len"], "task.data": data,
            "tokenizer": f"{len(tokenizer)} tokens, sha256 {hashlib.sha256(vocab.encode()).hexdigest()[:16]}"}


# ---------------------------------------------------------------------------------------------- resolvers
def safe_dirname(name: str, max_len: int = 120) -> str:
    """A sweep job's dir name from its overrides: '/' replaced, and names longer than max_len cut with a short
    hash of the whole appended (file systems refuse names over 255 bytes)."""
    name = str(name).replace("/", "_")
    if len(name) <= max_len:
        return name
    return name[: max_len - 9] + "_" + hashlib.sha256(name.encode()).hexdigest()[:8]


def hydra_output_subdir(default: str = ".hydra", resume=None, overwrite=False) -> str | None:
    """Only rank 0 writes Hydra's `.hydra/` (the other ranks of torchrun / srun compose the same config), and never
    into a dir that another process writes or that holds a run, unless overwrite=true replaces it: a resumed run
    keeps the first run's `.hydra/`, and a run that is refused changes nothing there."""
    if env_rank() != 0:
        return None
    runtime = HydraConfig.get().runtime if HydraConfig.initialized() else None
    run_dir = None if runtime is None or OmegaConf.is_missing(runtime, "output_dir") else runtime.output_dir
    if not run_dir:  # composed without a run (the compose API, --cfg)
        return default
    replacing = overwrite is True and not resume  # with resume too, the run is refused
    if rundir.in_use(run_dir) or (rundir.artefacts(run_dir) and not replacing):
        return None
    return default


OmegaConf.register_new_resolver("safe_dirname", safe_dirname, replace=True)
OmegaConf.register_new_resolver("llm_output_subdir", hydra_output_subdir, replace=True)
