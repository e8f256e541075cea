"""The ``lazarus`` command line.

    lazarus train {sft,dpo,grpo,ppo,orpo,simpo,kto,reward} --model DIR --data FILE [--eval-data FILE] [--config FILE.yaml]
                  [--output DIR] [--max-steps N] [--lora] [--resume PATH] [--set KEY=VALUE ...]
    lazarus init-model DIR [--arch qwen2] [--dtype bfloat16] [--quantize-bits 4]
    lazarus demo [--output DIR] [--quick]
    lazarus generate --model DIR [--adapter-path DIR] [--checkpoint FILE] --prompt TEXT [--max-tokens N] [--temp T]
    lazarus export --adapter RUN_OR_CHECKPOINT_DIR --output DIR [--dequantize] [--model BASE]

``--model`` takes a model folder or an earlier run folder (a full fine-tune's ``model/``, a LoRA
run's base with its adapters fused in), so runs chain: SFT -> DPO -> GRPO.

``lazarus train`` has one subcommand per paradigm of :mod:`lazarus.training.registry` (a
registered objective is trainable from here with no change to this file). A YAML config holds the
trainer's config fields (``learning_rate: 1e-5``, ``dpo: {beta: 0.1}``) and the run keys listed in
:data:`RUN_KEYS` (``model``, ``data``, ``lora``, ``tensorboard`` ...), see :mod:`lazarus.run_config`.
Command-line flags override the YAML. ``LAZARUS_DEBUG=1`` shows tracebacks.

Exit status (:data:`EXIT_CODES`): 0 the run finished what it was asked (its steps or epochs, or
an early-stopping target); 2 a user error, one line on stderr (bad config, data, model, checkpoint,
a run folder already in use, an unwritable or full disk); 130/143 interrupted by SIGINT/SIGTERM
after a checkpoint was written (the resume command is printed); 3 stopped by TerminateOnNaN (the
last finite checkpoint is kept); 1 a bug.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# EXIT_CODES, classify_error, RUN_KEYS, config_fields, _fmt_default and load_paradigm: importable from here too
from lazarus.cli_common import (EXIT_CODES, CLIError, CommandParser, HelpFormatter, classify_error,  # noqa: F401
                                run_command)
from lazarus.models.tiny import ARCHITECTURES, WEIGHT_DTYPES
from lazarus.run_config import (RUN_KEYS, _fmt_default, build_callbacks, config_fields, config_help,  # noqa: F401
                                load_paradigm, lora_kwargs, path_value, resolve_train_config, reward_kwargs)
from lazarus.run_folder import (exit_code, prepare_output, print_summary, run_files_callback, write_history,
                                write_model_folder)
from lazarus.training.registry import PARADIGMS, paradigms


# =============================================================================== train
def _rank() -> int:
    import mlx.core as mx

    return mx.distributed.init().rank() if mx.distributed.is_available() else 0


def cmd_train(args) -> int:
    """Every registered paradigm the same way: its trainer built with keywords, the data turned
    into datasets by the trainer itself."""
    paradigm, run, config, trainer_cls, _ = resolve_train_config(args)
    from lazarus.models import load_model

    output = Path(run["output"])
    extras = reward_kwargs(run) if PARADIGMS[paradigm].reward else {}
    lk = lora_kwargs(run.get("lora"))
    for key in ("data", "eval_data", "resume"):
        path_value(run, key)
    callbacks = build_callbacks(run, output)
    main_process = _rank() == 0
    lock = prepare_output(output, config, run, args.overwrite) if main_process else None
    try:
        adapter_path = path_value(run, "adapter_path")
        model, tok = load_model(path_value(run, "model"), adapter_path=adapter_path, seed=config.seed, **lk)
        reference = path_value(run, "reference_model")
        trainer = trainer_cls(model=model, tokenizer=tok, config=config,
                              callbacks=[*callbacks, run_files_callback(output, run, config)],
                              reference_model=load_model(reference)[0] if reference else None, **extras)
        train_ds, eval_ds = (_dataset(trainer, path, run.get("system_prompt")) for path in _data_paths(run))
        result = trainer.train(train_ds, eval_dataset=eval_ds, resume_from=path_value(run, "resume"),
                               allow_data_change=args.allow_data_change)
        if main_process:
            write_history(output, result)
            model_dir = write_model_folder(output, result, trainer, lk)
            print_summary(paradigm, run, result, trainer, lk, model_dir)
    finally:
        if lock is not None:
            lock.release()
    return exit_code(paradigm, run, result, main_process)


def _data_paths(run: dict) -> tuple[str, str | None]:
    """The training and eval data: ``data`` may be an mlx-lm folder (train.jsonl, valid.jsonl,
    test.jsonl): training reads its train split and, without ``eval_data``, evaluates on valid."""
    from lazarus.data.sources import data_splits

    data, eval_data = path_value(run, "data"), path_value(run, "eval_data")
    if eval_data is None and data is not None and Path(data).is_dir():
        valid = data_splits(data).get("valid")
        eval_data = str(valid) if valid is not None else None
    return data, eval_data


def _dataset(trainer, path: str | None, system_prompt: str | None):
    """The trainer's dataset of ``path`` (a file or an mlx-lm folder; capped at ``max_length``, else
    the model's context). A system prompt goes to the trainer's ``dataset_class`` directly:
    ``as_dataset`` takes no dataset options."""
    if path is None:
        return None
    if system_prompt is None:
        return trainer.as_dataset(path)
    from lazarus.data.formats import format_options

    return trainer.as_dataset(trainer.dataset_class(path, trainer.tokenizer, max_length=trainer.max_length(),
                                                    system_prompt=system_prompt,
                                                    **format_options(trainer.config, trainer.dataset_class)))


# =============================================================================== other commands
def cmd_init_model(args) -> int:
    from lazarus.models import create_tiny_model

    d = Path(args.dir)
    if d.exists() and not d.is_dir():
        raise CLIError(f"{d} exists and is not a directory")
    if d.is_dir() and (d / "config.json").exists() and not args.force:
        raise CLIError(f"{d} already holds a model (config.json); pass --force to overwrite it")
    kwargs = {k: getattr(args, k) for k in ("hidden_size", "num_layers", "seed", "arch", "dtype", "quantize_bits")
              if getattr(args, k) is not None}
    try:
        create_tiny_model(d, **kwargs)
    except ValueError as e:  # e.g. widths that a bit width cannot quantize
        raise CLIError(f"init-model: {e}") from e
    bits = f", {args.quantize_bits}-bit" if args.quantize_bits else ""
    shape = f"{args.arch or 'llama'}, {args.dtype or 'float32'}{bits}"
    print(f"wrote the tiny offline model ({shape}) to {d}")
    return 0


def load_for_generation(model_dir, adapter_path=None, checkpoint=None):
    """Load a model (plus optional adapters and a Lazarus checkpoint of trainable weights)."""
    from lazarus.models import load_model

    model, tok = load_model(model_dir, adapter_path=adapter_path)
    if checkpoint is not None:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        from lazarus import checkpointing as ckpt

        weights, _ = ckpt.read_weights(checkpoint)
        params = dict(tree_flatten(model.parameters()))
        unknown = sorted(set(weights) - set(params))
        if unknown:
            hint = " (a LoRA checkpoint needs --adapter-path of its checkpoint folder)" if any(
                "lora_" in k for k in unknown) else ""
            raise ckpt.CheckpointError(f"checkpoint {checkpoint} does not match this model: "
                                       f"{len(unknown)} unknown tensors, e.g. {unknown[0]}{hint}")
        bad = [k for k in weights if tuple(weights[k].shape) != tuple(params[k].shape)]
        if bad:
            raise ckpt.CheckpointError(f"checkpoint {checkpoint} does not match this model: shape of {bad[0]} "
                                       f"is {tuple(weights[bad[0]].shape)}, model has {tuple(params[bad[0]].shape)}")
        model.load_weights(list(weights.items()), strict=False)
        mx.eval(model.parameters())
    model.eval()
    return model, tok


def cmd_generate(args) -> int:
    import mlx.core as mx
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler

    from lazarus.data import chat_prompt_ids

    if args.max_tokens < 1:
        raise CLIError("--max-tokens must be >= 1")
    if args.temp < 0:
        raise CLIError("--temp must be >= 0")
    model, tok = load_for_generation(args.model, args.adapter_path, args.checkpoint)
    if args.seed is not None:
        mx.random.seed(args.seed)
    ids = chat_prompt_ids(tok, args.prompt, args.system)
    text = generate(model, tok, prompt=ids, max_tokens=args.max_tokens, sampler=make_sampler(temp=args.temp),
                    verbose=False)
    print(text)
    return 0


def cmd_export(args) -> int:
    """Fuse a LoRA run's adapters into its base and write a model folder."""
    from lazarus.models import ModelLoadError, fuse_adapters
    from lazarus.models.loading import adapter_source

    adapter = Path(args.adapter)
    if not adapter.is_dir():
        raise CLIError(f"adapter folder not found: {adapter} (pass a LoRA run folder or its checkpoint folder)")
    try:
        adapter_dir, base = adapter_source(adapter)
    except ModelLoadError as e:
        raise CLIError(str(e)) from None
    base = args.model or base
    if not base:
        raise CLIError(f"{adapter_dir}/adapter_config.json does not name the base model; pass --model BASE")
    out = Path(args.output)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise CLIError(f"--output {out} already exists and is not empty; choose a new folder")
    fuse_adapters(base, adapter_dir, out, dequantize=args.dequantize)
    print(f"wrote {out}: {base} with the adapters of {adapter_dir} fused in"
          f"{' (dequantized)' if args.dequantize else ''}; try: lazarus generate --model {out} --prompt '...'")
    return 0


# =============================================================================== parser
def _listed(names: list[str], last: str) -> str:
    """``["SFT", "DPO", "PPO"]`` -> ``"SFT, DPO<last>PPO"``."""
    return last.join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else "".join(names)


def build_parser() -> argparse.ArgumentParser:
    from lazarus import demo

    upper = [p.name.upper() for p in paradigms()]
    p = CommandParser(
        prog="lazarus", formatter_class=HelpFormatter,
        description=f"Lazarus: MLX-native post-training ({', '.join(upper)}).",
        epilog="examples:\n"
               "  lazarus demo                                   # the whole pipeline on the embedded tiny model\n"
               "  lazarus init-model tiny/                       # write the tiny offline model\n"
               "  lazarus train sft --model tiny/ --data train.jsonl --max-steps 200\n"
               "  lazarus train dpo --config examples/dpo.yaml --lora\n"
               "  lazarus generate --model tiny/ --prompt 'What is 2+3?'\n"
               "  lazarus export --adapter runs/dpo --output dpo_model   # LoRA adapters fused into a model folder\n"
               "  lazarus train sft --help                       # every config field with its default")
    p.add_argument("--version", action="version", version=f"lazarus {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help=f"train with {_listed(upper, ' or ')}", formatter_class=HelpFormatter,
                           description="Train a model. `lazarus train PARADIGM --help` lists every config key.")
    tsub = train.add_subparsers(dest="paradigm", metavar="PARADIGM")
    for paradigm in paradigms():
        name = paradigm.name
        try:
            epilog = config_help(name, paradigm.config_class)
        except Exception as e:  # noqa: BLE001 - a broken registered trainer must not break the whole CLI
            epilog = str(e)
        data = f" Data lines: {paradigm.data_format}." if paradigm.data_format else ""
        tp = tsub.add_parser(name, help=paradigm.description, formatter_class=HelpFormatter, epilog=epilog,
                             description=f"{paradigm.trainer_class.__name__}: {paradigm.description}.{data}")
        tp.add_argument("--model", metavar="DIR", help="model folder, or an earlier run folder (YAML: model)")
        tp.add_argument("--data", metavar="FILE", help="training data, JSON Lines (YAML: data)")
        tp.add_argument("--eval-data", metavar="FILE", help="evaluation data, JSON Lines (YAML: eval_data)")
        tp.add_argument("--config", "-c", metavar="FILE.yaml", help="YAML config: config fields and run keys")
        tp.add_argument("--output", "-o", metavar="DIR", help=f"run folder (YAML: output) [default: runs/{name}]")
        tp.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps (YAML: max_steps)")
        tp.add_argument("--lora", action="store_true", help="train LoRA adapters (YAML: lora: true)")
        tp.add_argument("--resume", metavar="PATH", help="resume from a checkpoint file (YAML: resume)")
        tp.add_argument("--overwrite", action="store_true",
                        help="clear the run folder first when it holds an earlier run (default: refuse)")
        tp.add_argument("--allow-data-change", action="store_true",
                        help="with --resume: accept training data that differs from the checkpoint's")
        tp.add_argument("--tensorboard", metavar="DIR", help="log to TensorBoard in DIR (YAML: tensorboard)")
        tp.add_argument("--set", "-s", action="append", metavar="KEY=VALUE", default=[],
                        help="set any config key, e.g. --set learning_rate=3e-4 --set dpo.beta=0.2 (repeatable)")
        tp.set_defaults(func=cmd_train)

    im = sub.add_parser("init-model", help="write the tiny offline model (a loadable mlx-lm llama + tokenizer)",
                        formatter_class=HelpFormatter)
    im.add_argument("dir", metavar="DIR")
    im.add_argument("--hidden-size", type=int, help="hidden size [default: 128]")
    im.add_argument("--num-layers", type=int, help="transformer blocks [default: 4]")
    im.add_argument("--seed", type=int, help="weight init seed [default: 0]")
    im.add_argument("--arch", choices=ARCHITECTURES, help="mlx-lm model class [default: llama]")
    im.add_argument("--dtype", choices=WEIGHT_DTYPES,
                    help="weights' dtype, as a published checkpoint's torch_dtype [default: float32]")
    im.add_argument("--quantize-bits", type=int, choices=(4, 8),
                    help="quantize as mlx_lm.convert -q does (scales in --dtype; e.g. --dtype float16)")
    im.add_argument("--force", action="store_true", help="overwrite a model already in DIR")
    im.set_defaults(func=cmd_init_model)

    dp = sub.add_parser("demo", help="build the tiny model, fine-tune it with SFT then DPO, show before/after",
                        formatter_class=HelpFormatter)
    demo.add_arguments(dp)
    dp.set_defaults(func=demo.command)

    gen = sub.add_parser("generate", help="generate a reply with a (fine-tuned) model", formatter_class=HelpFormatter)
    gen.add_argument("--model", required=True, metavar="DIR", help="base model folder")
    gen.add_argument("--adapter-path", metavar="DIR", help="LoRA adapters folder (a run's checkpoint_dir)")
    gen.add_argument("--checkpoint", metavar="FILE",
                     help="a Lazarus checkpoint (e.g. checkpoints/best.safetensors) to load into the model")
    gen.add_argument("--prompt", required=True, help="the user message (the chat template is applied)")
    gen.add_argument("--system", help="optional system message")
    gen.add_argument("--max-tokens", type=int, default=256, metavar="N", help="[default: 256]")
    gen.add_argument("--temp", type=float, default=0.0, metavar="T", help="sampling temperature, 0 = greedy "
                                                                        "[default: 0.0]")
    gen.add_argument("--seed", type=int, help="sampling seed")
    gen.set_defaults(func=cmd_generate)

    ex = sub.add_parser("export", help="fuse a LoRA run's adapters into its base model: a model folder",
                        formatter_class=HelpFormatter,
                        description="Write base + LoRA adapters as one model folder (config.json, weights in the "
                                    "base's dtype, tokenizer) that load_model, mlx_lm and --model accept.")
    ex.add_argument("--adapter", required=True, metavar="RUN_OR_CHECKPOINT_DIR",
                    help="a LoRA run folder, or a folder with adapters.safetensors + adapter_config.json")
    ex.add_argument("--output", "-o", required=True, metavar="DIR", help="the new model folder (must not exist, "
                                                                          "or be empty)")
    ex.add_argument("--model", metavar="BASE", help="base model (default: the one adapter_config.json names)")
    ex.add_argument("--dequantize", action="store_true", help="write a 4-bit base's layers as ordinary ones")
    ex.set_defaults(func=cmd_export)
    return p


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lazarus")
    except Exception:  # noqa: BLE001
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        if args.command == "train":
            print(f"lazarus: error: choose what to train: lazarus train {{{','.join(PARADIGMS)}}} ... "
                  "(see lazarus train --help)", file=sys.stderr)
        else:
            parser.print_help(sys.stderr)
        return 2
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
