"""Train the shipped policies on the reacher task by behaviour cloning, with DAgger.

Usage::

    python examples/train_policies.py                     # every policy, seed 0, into models/
    python examples/train_policies.py --model default --steps 2000 --eval-episodes 200
    python examples/train_policies.py --model instructed --eval-episodes 200    # the text-following policy
    python examples/train_policies.py --eval-only --eval-episodes 200   # evaluate the shipped weights

Data: every sample is an arm state (q, dq) and a target; its label is the expert's chunk
(``reacher.expert_actions``) and its image is rendered on the fly when a batch needs it, so a
sample costs 56 bytes and the dataset never holds a frame. The data set starts with states
drawn broadly over the joint space and with states visited by the expert executing its own
chunks under injected noise and observation staleness (DART); at ``--dagger-at`` fractions
of training the current policy drives ``--dagger-episodes`` episodes (chunks open loop,
random staleness 0-3, aligned or not) and every state it visits is added with the expert's
label (DAgger), so the policy learns to recover from its own mistakes.

Each policy is written to ``<out-dir>/<model>/model.safetensors`` through its own
``policy.py`` architecture, loaded back through ``policy_server.model.loader`` and evaluated
in process, fresh and with stale observations, on ``ReacherEnv(seed)`` episodes for seeds
from ``--eval-seed`` (1,000,000) on. Training never builds a ``ReacherEnv``: its episodes
and states come from one generator seeded with ``--seed`` (+1 for the transformer, +2 for
history, +3 for instructed), so the evaluation episodes are held out.

``--model instructed`` trains on the instructed reacher (``examples/reacher_instructed.py``,
a red and a blue disc and an instruction naming one; data and evaluation in
``examples/instructed_training.py``): each sample's prompt is drawn per batch from the
training phrasings, and the evaluation adds the held-out phrasings, the
mismatched-instruction control and the text-ignoring baseline. Reproducible: numpy and torch are seeded and torch runs
``--threads`` (2) threads; the same command on the same machine writes the same bytes.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from examples import reacher  # noqa: E402
from examples.instructed_training import INSTRUCTED_TASK, evaluate_instructed  # noqa: E402
from examples.local_policy import forward_one, load_local  # noqa: E402
from examples.training_data import (  # noqa: E402, F401 (the data and rollouts, re-exported)
    FIXED_TASK,
    MOVING_TASK,
    PADDED_FRACTION,
    Dataset,
    broad_states,
    collect,
    expert_fn,
    history_module_fn,
    module_fn,
    moving_broad_states,
    moving_expert_fn,
    moving_rollouts,
    render_batch,
    render_frames,
    rollouts,
    states_of,
)
from policy_server.contract import POLICY_FILE, WEIGHTS_FILE  # noqa: E402

log = logging.getLogger("train_policies")

MODELS = {"default": "CnnMlp", "transformer": "ChunkTransformer", "history": "HistoryCnnMlp",
          "instructed": "InstructedCnnMlp"}
SEED_OFFSETS = {"default": 0, "transformer": 1, "history": 2, "instructed": 3}
DEFAULT_STEPS = {"default": 1800, "transformer": 1200, "history": 1500, "instructed": 2000}
# history: the moving-target reacher, with a two-frame history window; instructed: the
# instructed reacher (examples/reacher_instructed.py), two discs and a text instruction
TASKS = {"default": FIXED_TASK, "transformer": FIXED_TASK, "history": MOVING_TASK, "instructed": INSTRUCTED_TASK}
EVAL_SEED = 1_000_000  # evaluation episodes are ReacherEnv(seed) for seeds from here on


def architecture(model_dir: str) -> torch.nn.Module:
    """A fresh (seeded) module of the class that ``model_dir/policy.py`` serves."""
    name = os.path.basename(os.path.normpath(model_dir))
    spec = importlib.util.spec_from_file_location(f"_train_{name}_policy", os.path.join(model_dir, POLICY_FILE))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, MODELS[name])()


# -- training -----------------------------------------------------------------------------


def train(name: str, args: argparse.Namespace) -> str:
    """Train one policy; returns the directory its weights were written to."""
    seed = args.seed + SEED_OFFSETS[name]
    task = TASKS[name]
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    started = time.perf_counter()
    module = architecture(os.path.join(ROOT, "models", name))
    module.train()
    steps = args.steps if args.steps is not None else DEFAULT_STEPS[name]
    log.info("%s: %d parameters, %d steps of batch %d, lr %g", name, sum(p.numel() for p in module.parameters()),
             steps, args.batch_size, args.lr)

    broad, trajectories = task.dataset(), task.dataset()
    broad.add(*task.broad(rng, args.broad_states))
    collect(trajectories, task.expert, rng, args.expert_episodes, args.expert_noise, "expert with noise",
            reacher.MAX_STEPS, task.rollouts)
    dagger_at = {int(f * steps) for f in args.dagger_at}

    optimizer = torch.optim.AdamW(module.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = 50
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i / steps, 1.0))))
    images = np.empty((args.batch_size, *task.frames, reacher.HEIGHT, reacher.WIDTH, 3), dtype=np.uint8)
    n_broad = int(round(args.batch_size * args.broad_fraction))
    running = 0.0
    for step in range(steps):
        if step in dagger_at:
            module.eval()
            collect(trajectories, task.policy(module, images), rng, args.dagger_episodes, 0.0, f"step {step} DAgger",
                    args.dagger_max_steps, task.rollouts)
            module.train()
        pick_broad = rng.integers(0, len(broad), n_broad)
        pick_traj = rng.integers(0, len(trajectories), args.batch_size - n_broad)
        batch = {
            key: np.concatenate([broad.arrays[key][pick_broad], trajectories.arrays[key][pick_traj]])
            for key in broad.arrays
        }
        inputs = task.inputs(batch, images, rng)
        label = torch.from_numpy(batch["label"])
        action = module(**inputs)["action"]
        # Joint commands in units of the speed limit; the ignored dims are taught to stay 0.
        loss = ((action[..., :2] - label[..., :2]).abs().mean() + 0.1 * action[..., 2:].abs().mean()) / 3.0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %.4f (%.0f s)", name, step, steps, running, time.perf_counter() - started)

    out_dir = os.path.join(args.out_dir, name)
    os.makedirs(out_dir, exist_ok=True)
    source = os.path.join(ROOT, "models", name, POLICY_FILE)
    if os.path.abspath(out_dir) != os.path.dirname(source):  # a directory the server can load
        shutil.copyfile(source, os.path.join(out_dir, POLICY_FILE))
    save_file(
        {k: v.detach().contiguous() for k, v in module.state_dict().items()}, os.path.join(out_dir, WEIGHTS_FILE)
    )
    log.info("%s: trained in %.0f s, wrote %s", name, time.perf_counter() - started, out_dir)
    return out_dir


def policy_chunk_fn(model_dir: str):
    """``obs -> float32[10, 7]`` through the served loading path (strict weights, ModulePolicy)."""
    model = load_local(model_dir)
    return lambda obs: forward_one(model, obs)["action"]


def evaluate(model_dir: str, episodes: int, first_seed: int, moving_target: bool | None = None) -> dict[str, float]:
    """Success rates over staleness 0-3; a history model is fed its declared windows and, by
    default, moving targets (``moving_target`` overrides)."""
    chunk_fn = policy_chunk_fn(model_dir)
    spec = load_local(model_dir).input_spec
    windows = {s.name: (s.history.steps, s.history.pad) for s in spec if s.history is not None}
    moving = bool(windows) if moving_target is None else moving_target
    seeds = range(first_seed, first_seed + episodes)
    rates = {}
    for staleness in range(4):
        for align in (True, False) if staleness else (True,):
            started = time.perf_counter()
            rate, results = reacher.evaluate(
                chunk_fn, seeds, staleness=staleness, align=align, moving_target=moving, windows=windows
            )
            key = f"staleness {staleness}" + ("" if align or not staleness else " unaligned")
            rates[key] = rate
            log.info(
                "%s: %s%s success %.2f over %d episodes (mean %.1f steps, %.1f s)",
                os.path.basename(model_dir),
                "moving target, " if moving else "",
                key,
                rate,
                episodes,
                np.mean([r.steps for r in results]),
                time.perf_counter() - started,
            )
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out-dir",
        default=os.path.join(ROOT, "models"),
        help="writes <out-dir>/<model>/model.safetensors (default: the repo's models/)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps (default: 1800 for default, 1200 for transformer, 1500 for history, "
        "2000 for instructed)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--broad-states", type=int, default=20000, help="states drawn over the whole joint space")
    parser.add_argument("--broad-fraction", type=float, default=0.25, help="share of each batch from the broad states")
    parser.add_argument("--expert-episodes", type=int, default=800, help="noisy expert episodes at the start")
    parser.add_argument("--expert-noise", type=float, default=0.6, help="rad/s of noise on the expert's commands")
    parser.add_argument(
        "--dagger-at",
        type=float,
        nargs="*",
        default=[0.35, 0.6, 0.8],
        help="fractions of training after which the policy collects data",
    )
    parser.add_argument("--dagger-episodes", type=int, default=64)
    parser.add_argument("--dagger-max-steps", type=int, default=60, help="DAgger episodes stop here")
    parser.add_argument("--eval-episodes", type=int, default=50)
    parser.add_argument("--eval-seed", type=int, default=EVAL_SEED)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-only", action="store_true", help="evaluate the weights in --out-dir, train nothing")
    parser.add_argument(
        "--eval-moving",
        choices=["auto", "yes", "no"],
        default="auto",
        help="evaluate on moving targets (auto: history models only)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.eval_seed < EVAL_SEED:
        log.warning("evaluation seeds below %d overlap the training draws", EVAL_SEED)
    names = list(MODELS) if args.model == "all" else [args.model]
    for name in names:
        model_dir = os.path.join(args.out_dir, name) if args.eval_only else train(name, args)
        if args.eval_episodes and name == "instructed":
            evaluate_instructed(model_dir, args.eval_episodes, args.eval_seed)
        elif args.eval_episodes:
            evaluate(
                model_dir,
                args.eval_episodes,
                args.eval_seed,
                None if args.eval_moving == "auto" else args.eval_moving == "yes",
            )


if __name__ == "__main__":
    main()
