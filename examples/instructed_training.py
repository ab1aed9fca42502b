"""The instructed reacher's training data and evaluation for ``examples/train_policies.py --model instructed``.

Every sample is an arm state (q, dq), the named target, the other target and whether the
named one is red; its label is the expert's chunk toward the named target, its image (both
discs) is rendered per batch and its prompt is drawn per batch from
``reacher_instructed.TRAIN_PHRASINGS`` (the label depends only on the named colour, so
every phrasing of it is an equally good input). Rollouts (the noisy expert, DART; the
policy, DAgger) run in lockstep through ``training_data.lockstep`` and end on the named
target only, so a policy that heads for the wrong disc keeps visiting states the expert
labels toward the right one.

:func:`evaluate_instructed` reports success on held-out seeds (held-out and training
phrasings, staleness 0-3), the mismatched-instruction control and the text-ignoring
baseline. Logs as ``train_policies``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from examples import reacher, reacher_instructed
from examples.local_policy import forward_one, load_local
from examples.reacher_instructed import COLOURS, TRAIN_PHRASINGS, evaluate, instruction, with_prompt
from examples.training_data import Dataset, Task, lockstep, states_of

log = logging.getLogger("train_policies")

BASELINE_PROMPTS = ("reach the red target", "reach the blue target")  # fixed prompts: the text ignored


class InstructedDataset(Dataset):
    """Arm states, the named and the other target, ``red`` (1.0 when the named target is red)
    and the expert's labels toward the named target."""

    def __init__(self) -> None:
        self.parts = {key: [] for key in ("q", "dq", "target", "other", "red", "label")}
        self.arrays = {}

    def add(self, q, dq, target, other, red, phrasing=None) -> None:  # type: ignore[override]
        """Add states; ``phrasing`` (the rollout's template index) is not kept: prompts are drawn per batch."""
        label = reacher.expert_actions(q, dq, target)
        for key, value in (("q", q), ("dq", dq), ("target", target), ("other", other), ("red", red), ("label", label)):
            self.parts[key].append(np.asarray(value, dtype=np.float32))
        self.arrays = {key: np.concatenate(parts) for key, parts in self.parts.items()}


def scenes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    """``n`` drawn episodes as arrays: start q [n, 2], named target [n, 2], other [n, 2],
    red [n] (1.0: the named one is red) and the phrasing index [n] into TRAIN_PHRASINGS."""
    drawn = [reacher_instructed.sample_instructed(rng, TRAIN_PHRASINGS) for _ in range(n)]
    q = np.stack([e.q for e in drawn])
    target = np.stack([e.positions[e.colour] for e in drawn])
    other = np.stack([e.positions[COLOURS[1 - COLOURS.index(e.colour)]] for e in drawn])
    red = np.array([e.colour == "red" for e in drawn], dtype=np.float32)
    phrasing = np.array([TRAIN_PHRASINGS.index(e.phrasing) for e in drawn])
    return q, target, other, red, phrasing


def broad_states(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    """Arm states spread over (and a little beyond) the joint space, each with a drawn scene."""
    q = np.stack([rng.uniform(-0.8, 4.8, n), rng.uniform(-3.1, 3.1, n)], axis=1)
    moving = rng.random((n, 1)) < 0.7
    dq = moving * rng.uniform(-reacher.MAX_JOINT_SPEED, reacher.MAX_JOINT_SPEED, (n, 2))
    _, target, other, red, _ = scenes(rng, n)
    return q, dq, target, other, red


def rollouts(chunk_fn, rng: np.random.Generator, episodes: int, *, staleness: int, align: bool, noise: float = 0.0,
             max_steps: int = reacher.MAX_STEPS):
    """Lockstep episodes of drawn scenes; ``chunk_fn(seen_q, seen_dq, target, other, red,
    phrasing) -> [N, 10, 7]``. Returns the visited (q, dq, target, other, red, phrasing)
    and the success rate (named target reached)."""
    q, target, other, red, phrasing = scenes(rng, episodes)
    return lockstep(chunk_fn, rng, q, target, (target, other, red, phrasing), staleness=staleness, align=align,
                    noise=noise, max_steps=max_steps)


def expert_fn(seen_q, seen_dq, target, other, red, phrasing):
    return reacher.expert_actions(seen_q, seen_dq, target)


def render_scenes(q, target, other, red, out: np.ndarray) -> np.ndarray:
    """Images [N, 480, 640, 3] of the arm and both discs (the named one red where ``red``)."""
    for i in range(len(q)):
        red_at, blue_at = (target[i], other[i]) if red[i] else (other[i], target[i])
        reacher_instructed.render_scene(q[i], red_at, blue_at, out=out[i])
    return out[: len(q)]


def prompts_of(red: np.ndarray, phrasing: np.ndarray) -> list[str]:
    """The prompt of each sample: its phrasing (index into TRAIN_PHRASINGS) naming its colour."""
    return [instruction("red" if r else "blue", TRAIN_PHRASINGS[int(p)]) for r, p in zip(red, phrasing, strict=True)]


def module_fn(module: torch.nn.Module, image_buffer: np.ndarray):
    """A lockstep ``chunk_fn`` that renders the observed scenes and runs ``module`` in batches."""

    def chunk_fn(seen_q, seen_dq, target, other, red, phrasing):
        out = []
        with torch.inference_mode():
            for i in range(0, len(seen_q), len(image_buffer)):
                part = slice(i, i + len(image_buffer))
                images = render_scenes(seen_q[part], target[part], other[part], red[part], image_buffer)
                state = torch.from_numpy(states_of(seen_q[part], seen_dq[part]))
                prompt = prompts_of(red[part], phrasing[part])
                out.append(module(state, torch.from_numpy(images), prompt)["action"].numpy())
        return np.concatenate(out)

    return chunk_fn


def batch_inputs(batch: dict[str, np.ndarray], images: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    """The module's inputs for a batch of samples; each sample's phrasing is drawn here."""
    phrasing = rng.integers(0, len(TRAIN_PHRASINGS), len(batch["q"]))
    return {
        "state": torch.from_numpy(states_of(batch["q"], batch["dq"])),
        "image": torch.from_numpy(render_scenes(batch["q"], batch["target"], batch["other"], batch["red"], images)),
        "prompt": prompts_of(batch["red"], phrasing),
    }


INSTRUCTED_TASK = Task(InstructedDataset, broad_states, expert_fn, rollouts, module_fn, batch_inputs)


# -- evaluation ---------------------------------------------------------------------------------


def evaluate_instructed(model_dir: str, episodes: int, first_seed: int) -> dict[str, float]:
    """Success rates of the policy in ``model_dir`` on seeds ``first_seed`` on (loaded as
    served, called in process): all, held-out and training phrasings (staleness 0; the
    scenes and named colours are the same in the three), all phrasings at staleness 1-3
    (aligned and not), the mismatched-instruction control (the other target named in the
    same scenes; ``both instructions``: scenes where the drawn and the swapped instruction
    both succeed) and the text-ignoring baseline (one fixed prompt for every episode)."""
    model = load_local(model_dir)

    def chunk_fn(obs):
        return forward_one(model, obs)["action"]

    seeds = range(first_seed, first_seed + episodes)
    runs: dict[str, tuple] = {
        "all phrasings": ({}, chunk_fn),
        "held-out phrasings": ({"phrasings": "held-out"}, chunk_fn),
        "training phrasings": ({"phrasings": "train"}, chunk_fn),
    }
    for staleness in range(1, 4):
        for align in (True, False):
            runs[f"staleness {staleness}" + ("" if align else " unaligned")] = (
                {"staleness": staleness, "align": align}, chunk_fn)
    runs["mismatched (other target named)"] = ({"swap": True}, chunk_fn)
    for prompt in BASELINE_PROMPTS:
        runs[f"text ignored (always {prompt!r})"] = ({}, with_prompt(chunk_fn, prompt))
    rates, successes = {}, {}
    for key, (options, fn) in runs.items():
        started = time.perf_counter()
        result = evaluate(fn, seeds, **options)
        rates[key] = result.success_rate
        successes[key] = [r.success for r in result.results]
        log.info("%s: %s success %.3f, ended on the other target %.3f, over %d episodes (mean %.1f steps, %.1f s)",
                 model.name, key, result.success_rate, result.other_rate, episodes,
                 np.mean([r.steps for r in result.results]), time.perf_counter() - started)
    rates["both instructions"] = float(np.mean(np.logical_and(
        successes["all phrasings"], successes["mismatched (other target named)"])))
    log.info("%s: both instructions succeed in %.3f of the scenes", model.name, rates["both instructions"])
    return rates
