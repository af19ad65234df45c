"""Taylor pruning of two small trained transformers, end to end: a Vision
Transformer on Fashion-MNIST (``vit``) and a character-level GPT on the Python
standard library's own sources (``gpt``).

For each task one dense model is trained; then for each criterion a copy is
pruned while training (attention heads, MLP neurons and the residual width,
ranked globally; the paper's schedule scaled down: ``--every`` minibatches
between steps) to ``--target-flops`` of its MACs, trained on to
``--prune-epochs`` (so every criterion trains as long), fine-tuned, finalized,
evaluated and timed. Every criterion sees the same minibatches in the same
order. A criterion is ``NAME`` or ``NAME/macs``:

* ``fo_gate``, ``fo_fg``, ``so_fisher``: the Taylor criteria of TaylorPruner;
  ``l2``: the L2 norm of each unit's weights; ``random``: uniform scores;
* ``/macs``: each unit's score divided by the MACs its removal saves
  (``TaylorPruner(normalize="macs")``), so a head competes with MLP neurons at
  its price;
* ``tp_taylor``: Torch-Pruning's ``GroupTaylorImportance`` through its
  ``MetaPruner`` (its default per-layer ratios, ``--tp-global`` for its global
  ranking; it cannot remove the ViT's nn.MultiheadAttention heads, and the GPT's
  only with ``--tp-heads``: whole heads, at most ``--tp-head-ratio`` of them, but
  1.6.1 empties a layer within a few iterative steps), stepped on the
  same minibatches. It removes channels at every step, so its Adam optimizer is
  rebuilt after each one. A criterion that fails is reported as failed.

A control row trains the dense model as many more epochs, unpruned.

    python -m benchmarks.transformer_pruning vit     # about 25 minutes on 2 CPU cores
    python -m benchmarks.transformer_pruning gpt     # about 35 minutes
    python -m benchmarks.transformer_pruning all --quick   # tiny settings, to check that it runs

Prints a Markdown table per task; ``--json FILE`` writes the numbers.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import platform
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pyprune_ext import data, models
from pyprune_ext.bench.common import machine_name, median_seconds, print_table, write_json
from pyprune_ext.cost import count_cost
from pyprune_ext.graph.specs import spec_for
from pyprune_ext.graph.surgery import member_positions
from pyprune_ext.taylor import Importance, Target, TaylorPruner

from .taylor_pruning import subset

TAYLOR = ("fo_gate", "fo_fg", "so_fisher")
# the epoch numbers (data orders) the phases start at: dense training from 0, then pruning (and
# the control's extra training), then fine-tuning, the same for every criterion
PRUNING_EPOCHS, FINETUNE_EPOCHS = 100, 200
DEFAULT_CRITERIA = ("fo_gate/macs", "fo_fg/macs", "so_fisher/macs", "fo_gate", "l2", "l2/macs", "random",
                    "tp_taylor")


class L2Magnitude(Importance):
    """The L2 norm of each unit's weights in the layers computing it: a head's q/k/v
    rows, a neuron's row of the first MLP layer (the "out" and "heads" members)."""

    def __init__(self, model, groups):
        self.modules, self.groups = dict(model.named_modules()), list(groups)

    def end_minibatch(self) -> bool:
        return True  # read from the weights when asked

    def means(self) -> list[Tensor]:
        return [self._score(group) for group in self.groups]

    def _score(self, group) -> Tensor:
        total = torch.zeros(group.size, dtype=torch.float64)
        for member in group.members_with_role("out", "heads"):
            module = self.modules[member.name]
            positions = member_positions(member, torch.arange(group.size))
            for name, tensor, dim, index in spec_for(module).entries(module, member.role, positions):
                if name not in ("weight", "in_proj_weight"):
                    continue
                rows = tensor.detach().index_select(dim, index.to(tensor.device)).movedim(dim, 0)
                squares = rows.double().pow(2).reshape(len(index), -1).sum(1).cpu()
                total += squares.reshape(-1, len(positions)).sum(0).reshape(group.size, member.span).sum(1)
        return total.sqrt()


class RandomScores(Importance):
    """Uniform random scores, drawn anew at each pruning step (a fixed generator)."""

    def __init__(self, model, groups, seed: int = 0):
        self.groups = list(groups)
        self.generator = torch.Generator().manual_seed(seed)

    def end_minibatch(self) -> bool:
        return True

    def means(self) -> list[Tensor]:
        return [torch.rand(g.size, generator=self.generator, dtype=torch.float64) for g in self.groups]


IMPORTANCES = {"l2": L2Magnitude, "random": RandomScores}


def parse_criterion(text: str) -> tuple[str, str | None]:
    """``"fo_gate/macs"`` -> ("fo_gate", "macs"); ``"l2"`` -> ("l2", None)."""
    name, _, normalize = text.partition("/")
    if name not in (*TAYLOR, "fo_weight", *IMPORTANCES, "tp_taylor") or normalize not in ("", "macs", "params"):
        raise argparse.ArgumentTypeError(f"unknown criterion {text!r}: NAME or NAME/macs, NAME one of "
                                         f"{', '.join((*TAYLOR, 'fo_weight', *IMPORTANCES, 'tp_taylor'))}")
    if name == "tp_taylor" and normalize:
        raise argparse.ArgumentTypeError("tp_taylor takes no /normalization (Torch-Pruning ranks its own way)")
    return name, normalize or None


@dataclass
class Task:
    """What the criterion loop needs to know about one model and its data."""

    name: str
    title: str
    model: nn.Module                                   # untrained
    example: Tensor                                    # for the analysis and the MAC counts
    loader: Callable[[int], Iterable]                  # epoch -> its minibatches (the same for every run)
    loss: Callable[[nn.Module, object], Tensor]
    evaluate: Callable[[nn.Module], float]             # the metric on held-out data
    metric: str                                        # "accuracy" (higher is better) or "perplexity"
    units: Callable[[nn.Module], dict]                 # heads, neurons, width left
    latency_input: Callable[[int], Tensor]             # a batch of this size, to time inference
    torch_pruning_options: Callable[[nn.Module], dict]
    epochs: int
    every: int                                         # minibatches between pruning steps
    prune_per_step: int                                # units removed per step (ours)
    prune_epochs: int                                  # every pruning run trains at least this long
    lr: float = 1e-3
    finetune_lr: float = 3e-4


def fit(model: nn.Module, task: Task, lr: float, *, epochs: int | None = None, first_epoch: int = 0,
        on_step: Callable[[], object] | None = None, until: Callable[[], bool] | None = None,
        device: str = "cpu") -> int:
    """Adam on ``task.loss`` for ``epochs`` epochs, and on until ``until()`` holds at
    an epoch's end; epoch k of the call reads ``task.loader(first_epoch + k)``, so every
    run that starts at the same epoch sees the same minibatches in the same order.
    ``on_step`` runs after each backward pass; when it returns True it has replaced
    parameters (Torch-Pruning) and the optimizer is rebuilt. Returns the epochs trained."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    trained = 0
    while trained < (epochs or 0) or (until is not None and not until()):
        model.train()
        for batch in task.loader(first_epoch + trained):
            loss = task.loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            if on_step is not None and on_step() is True:
                optimizer = torch.optim.Adam(model.parameters(), lr=lr)
            optimizer.step()
        trained += 1
    return trained


def inference_ms(model: nn.Module, x: Tensor, device: str) -> float:
    model.eval()
    with torch.no_grad():
        return median_seconds(lambda: model(x), device, min_run_time=0.5) * 1e3


# ------------------------------------------------------------------------------ tasks

def _classifier_accuracy(model, loader, device) -> float:
    model.eval()
    correct = count = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
            count += len(y)
    return correct / count


def vit_task(args) -> Task:
    splits = data.load_dataset("fashion-mnist", root=args.data_dir, seed=args.seed)
    train_set = subset(splits.train, args.train_examples)
    test_loader = data.make_loader(splits.test if not args.quick else subset(splits.test, 1000), 1000)
    device = args.device

    def loss(model, batch):
        x, y = batch
        return F.cross_entropy(model(x.to(device)), y.to(device))

    def units(model):
        return {"heads": sum(b.attn.num_heads for b in model.blocks),
                "neurons": sum(b.mlp[0].out_features for b in model.blocks),
                "width": model.patch_embed.out_channels}

    def torch_pruning_options(model):
        # Torch-Pruning prunes nn.MultiheadAttention's embedding width, not its heads
        return {"num_heads": {b.attn: b.attn.num_heads for b in model.blocks}, "ignored_layers": [model.head],
                "unwrapped_parameters": [(model.position, 2)]}

    torch.manual_seed(args.seed)
    return Task("vit", f"ViT on Fashion-MNIST ({args.train_examples} training examples, {args.vit_epochs} epochs)",
                models.vit((1, 28, 28), 10).to(device), torch.zeros(2, 1, 28, 28, device=device),
                lambda epoch: data.make_loader(train_set, 64, shuffle=True, seed=args.seed * 1000 + epoch), loss,
                lambda model: _classifier_accuracy(model, test_loader, device), "accuracy", units,
                lambda batch: torch.randn(batch, 1, 28, 28, device=device), torch_pruning_options, args.vit_epochs,
                args.every or 30, args.prune_per_step or 12, args.prune_epochs or 6)


def gpt_task(args) -> Task:
    corpus = data.load_python_corpus(max_chars=args.chars, context=args.context)
    device = args.device
    val_windows = _windows(corpus.val, args.context, args.val_windows)

    def loss(model, batch):
        x, y = (t.to(device) for t in batch)
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def perplexity(model):
        model.eval()
        total = count = 0.0
        with torch.no_grad():
            for x, y in val_windows:
                logits = model(x.to(device))
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1),
                                         reduction="sum").item()
                count += y.numel()
        return math.exp(total / count)

    def units(model):
        return {"heads": sum(b.attn.num_heads for b in model.blocks),
                "neurons": sum(b.mlp[0].out_features for b in model.blocks),
                "width": model.tok.embedding_dim}

    def torch_pruning_options(model):
        heads = {}
        for block in model.blocks:
            heads.update({layer: block.attn.num_heads for layer in (block.attn.q, block.attn.k, block.attn.v)})
        # Torch-Pruning 1.6.1 removes ceil(ratio of this step x heads left) >= 1 head per layer at every
        # iterative step, so a 4-head layer is empty after 4 steps (ZeroDivisionError): its heads are
        # kept unless --tp-heads
        return {"num_heads": heads, "prune_num_heads": args.tp_heads, "prune_head_dims": False,
                "head_pruning_ratio": args.tp_head_ratio, "ignored_layers": [model.lm_head]}

    def loader(epoch):
        return data.text_loader(corpus.train, args.context, args.gpt_batch, shuffle=True,
                                seed=args.seed * 1000 + epoch, steps=args.steps_per_epoch)

    torch.manual_seed(args.seed)
    model = models.char_gpt(corpus.vocab_size, context=args.context).to(device)
    title = (f"Character-level GPT on the Python {platform.python_version()} standard library's sources "
             f"({len(corpus.train):,} training / {len(corpus.val):,} validation characters from {corpus.files} "
             f"files, {args.gpt_epochs} epochs of {args.steps_per_epoch} minibatches)")
    return Task("gpt", title, model, torch.zeros(2, args.context, dtype=torch.long, device=device), loader, loss,
                perplexity, "perplexity", units,
                lambda batch: torch.randint(0, corpus.vocab_size, (batch, args.context), device=device),
                torch_pruning_options, args.gpt_epochs, args.every or 20, args.prune_per_step or 40,
                args.prune_epochs or 4)


def _windows(tokens: Tensor, context: int, count: int) -> list[tuple[Tensor, Tensor]]:
    """Up to ``count`` consecutive non-overlapping (input, next-character) windows, in batches of 64."""
    n = min(count, (len(tokens) - 1) // context)
    if n < 1:
        raise ValueError(f"the validation text ({len(tokens)} characters) is shorter than one window of {context}")
    x = tokens[:n * context].reshape(n, context)
    y = tokens[1:n * context + 1].reshape(n, context)
    return [(x[i:i + 64], y[i:i + 64]) for i in range(0, n, 64)]


# ------------------------------------------------------------------------ pruning

def prune_ours(model, task, name, normalize, args) -> dict:
    importance = IMPORTANCES.get(name, name)
    pruner = TaylorPruner(model, task.example, importance, target=Target.flops(args.target_flops),
                          every=task.every, prune_per_step=task.prune_per_step, normalize=normalize or False)
    epochs = fit(model, task, task.lr, epochs=task.prune_epochs, first_epoch=PRUNING_EPOCHS, on_step=pruner.step,
                 until=lambda: pruner.done, device=args.device)
    metric_just_pruned = task.evaluate(model)
    fit(model, task, task.finetune_lr, epochs=args.finetune_epochs, first_epoch=FINETUNE_EPOCHS, device=args.device)
    small = pruner.finalize()
    report = pruner.report()
    return {"model": small, "epochs": epochs, "just_pruned": metric_just_pruned, "steps": report.steps,
            "flops_kept": report.flops_kept, "params_kept": report.params_kept}


def torch_pruning_version() -> str | None:
    if importlib.util.find_spec("torch_pruning") is None:
        return None
    import torch_pruning
    return torch_pruning.__version__


def prune_torch_pruning(model, task, args) -> dict:
    """Torch-Pruning's Taylor importance, stepped every ``task.every`` minibatches on
    the same data as ours until the MACs target is reached."""
    import torch_pruning as tp

    before = count_cost(model, (task.example,))
    steps = args.tp_steps
    # Torch-Pruning's default per-layer ratios: its global ranking with head pruning fails in 1.6.1
    # (UnboundLocalError on head_thres) at the first step that removes no head
    pruner = tp.pruner.MetaPruner(model, task.example, importance=tp.importance.GroupTaylorImportance(),
                                  global_pruning=args.tp_global, pruning_ratio=args.tp_ratio, iterative_steps=steps,
                                  **task.torch_pruning_options(model))
    state = {"minibatches": 0, "steps": 0, "done": False}

    def step():
        state["minibatches"] += 1
        if state["done"] or state["minibatches"] % task.every:
            return False
        pruner.step()  # ranks by the gradients of this minibatch, as Torch-Pruning documents
        state["steps"] += 1
        macs = count_cost(model, (task.example,)).total_macs
        state["done"] = macs <= args.target_flops * before.total_macs or state["steps"] == steps
        return True

    epochs = fit(model, task, task.lr, epochs=task.prune_epochs, first_epoch=PRUNING_EPOCHS, on_step=step,
                 until=lambda: state["done"], device=args.device)
    metric_just_pruned = task.evaluate(model)
    fit(model, task, task.finetune_lr, epochs=args.finetune_epochs, first_epoch=FINETUNE_EPOCHS, device=args.device)
    after = count_cost(model, (task.example,))
    return {"model": model, "epochs": epochs, "just_pruned": metric_just_pruned, "steps": state["steps"],
            "target_reached": after.total_macs <= args.target_flops * before.total_macs,
            "flops_kept": after.total_macs / before.total_macs, "params_kept": after.total_params / before.total_params,
            "version": tp.__version__}


def _versus_dense(task: Task, value: float, dense: float) -> str:
    if task.metric == "accuracy":
        return f"{value - dense:+.4f}"
    return f"{value / dense - 1:+.1%}"


def run_task(task: Task, args) -> dict:
    dense = task.model
    start = time.perf_counter()
    fit(dense, task, task.lr, epochs=task.epochs, device=args.device)
    dense_seconds = time.perf_counter() - start
    dense_metric = task.evaluate(dense)
    dense_units = task.units(dense)
    results = {"dense": {task.metric: dense_metric, "train_seconds": dense_seconds, **dense_units}}
    unit_cells = lambda u: [str(u["heads"]), str(u["neurons"]), str(u["width"])]  # noqa: E731
    rows = [["dense", "100%", "100%", *unit_cells(dense_units), "-", "-", f"{dense_metric:.4f}", "-", "-"]]
    extra_epochs = 0
    for text in args.criteria:
        name, normalize = parse_criterion(text)
        if name == "tp_taylor" and torch_pruning_version() is None:
            print(f"{text}: skipped, torch_pruning is not installed")
            continue
        torch.manual_seed(args.seed)
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        try:
            out = prune_torch_pruning(model, task, args) if name == "tp_taylor" else \
                prune_ours(model, task, name, normalize, args)
        except Exception as error:  # noqa: BLE001 - one failing criterion must not lose the others
            results[text] = {"error": f"{type(error).__name__}: {error}"}
            rows.append([text, f"failed: {type(error).__name__}: {error}"[:100], *["-"] * 9])
            continue
        seconds = time.perf_counter() - start
        small = out.pop("model")
        extra_epochs = max(extra_epochs, out["epochs"])
        final = task.evaluate(small)
        timing = {b: (inference_ms(dense, task.latency_input(b), args.device),
                      inference_ms(small, task.latency_input(b), args.device)) for b in (1, 64)}
        units = task.units(small)
        just_pruned = out.pop("just_pruned")
        results[text] = {**out, **units, f"{task.metric}_just_pruned": just_pruned,
                         f"{task.metric}_final": final, "seconds": seconds,
                         "inference_ms": {str(b): {"dense": t[0], "pruned": t[1]} for b, t in timing.items()}}
        r = results[text]
        rows.append([text, f"{r['flops_kept']:.1%}", f"{r['params_kept']:.1%}", *unit_cells(units),
                     f"{r[f'{task.metric}_just_pruned']:.4f}", _versus_dense(task, final, dense_metric),
                     f"{final:.4f}", f"{timing[1][0]:.2f} / {timing[1][1]:.2f}",
                     f"{timing[64][0]:.1f} / {timing[64][1]:.1f}"])
    # the control: the dense model trained as long as the longest pruning run, then fine-tuned alike
    control = copy.deepcopy(dense)
    torch.manual_seed(args.seed)
    fit(control, task, task.lr, epochs=extra_epochs, first_epoch=PRUNING_EPOCHS, device=args.device)
    fit(control, task, task.finetune_lr, epochs=args.finetune_epochs, first_epoch=FINETUNE_EPOCHS, device=args.device)
    control_metric = task.evaluate(control)
    results["dense_control"] = {task.metric: control_metric, "extra_epochs": extra_epochs}
    rows.insert(1, [f"dense, +{extra_epochs}+{args.finetune_epochs} epochs", "100%", "100%", *unit_cells(dense_units),
                    "-", _versus_dense(task, control_metric, dense_metric), f"{control_metric:.4f}", "-", "-"])
    print_table(f"{task.title}, then pruning every {task.every} minibatches to {args.target_flops:.0%} MACs and "
                f"{args.finetune_epochs} epochs of fine-tuning, {machine_name(args.device)}",
                ["criterion", "MACs kept", "params kept", "heads", "MLP neurons", "width",
                 f"{task.metric} just pruned", "final vs dense", f"{task.metric} final",
                 "batch 1 ms (dense / pruned)", "batch 64 ms (dense / pruned)"], rows)
    return results


TASKS = {"vit": vit_task, "gpt": gpt_task}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=[*TASKS, "all"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check that it runs")
    parser.add_argument("--criteria", nargs="+", default=list(DEFAULT_CRITERIA), type=str,
                        help="NAME or NAME/macs (default: %(default)s)")
    parser.add_argument("--target-flops", type=float, default=0.5)
    parser.add_argument("--every", type=int, help="minibatches between pruning steps (vit 30, gpt 20)")
    parser.add_argument("--prune-per-step", type=int, help="units removed per step, ours (vit 12, gpt 40)")
    parser.add_argument("--prune-epochs", type=int,
                        help="epochs every pruning run trains (on until its target; vit 6, gpt 4), so that all "
                             "criteria get the same training")
    parser.add_argument("--tp-steps", type=int, default=60, help="Torch-Pruning's iterative_steps")
    parser.add_argument("--tp-ratio", type=float, default=0.95,
                        help="Torch-Pruning's pruning_ratio (and head ratio) at its last step; it stops earlier, at "
                             "the MACs target")
    parser.add_argument("--tp-head-ratio", type=float, default=0.5,
                        help="Torch-Pruning's head_pruning_ratio at its last step (per layer it removes the ratio's "
                             "ceiling of the heads, so a ratio near 1 would remove them all)")
    parser.add_argument("--tp-heads", action="store_true",
                        help="let Torch-Pruning remove GPT heads (prune_num_heads; 1.6.1 removes at least one head "
                             "per layer at every step and fails once a layer is empty)")
    parser.add_argument("--tp-global", action="store_true",
                        help="Torch-Pruning's global ranking (default: its per-layer ratios)")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    vit = parser.add_argument_group("vit")
    vit.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    vit.add_argument("--vit-epochs", type=int, default=30)
    vit.add_argument("--train-examples", type=int, default=20000)
    gpt = parser.add_argument_group("gpt")
    gpt.add_argument("--gpt-epochs", type=int, default=8)
    gpt.add_argument("--steps-per-epoch", type=int, default=200, help="minibatches per GPT epoch")
    gpt.add_argument("--gpt-batch", type=int, default=32)
    gpt.add_argument("--context", type=int, default=64)
    gpt.add_argument("--chars", type=int, default=2_000_000, help="characters of the corpus read")
    gpt.add_argument("--val-windows", type=int, default=512, help="validation windows evaluated")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    for text in args.criteria:
        try:
            parse_criterion(text)
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
    if args.quick:
        args.vit_epochs, args.train_examples, args.every, args.finetune_epochs = 1, 1000, 2, 1
        args.gpt_epochs, args.steps_per_epoch, args.chars, args.context, args.val_windows = 1, 20, 200_000, 32, 64
        args.prune_per_step, args.tp_steps, args.prune_epochs = 40, 12, 1
    results = {}
    for name in (TASKS if args.task == "all" else [args.task]):
        results[name] = run_task(TASKS[name](args), args)
    if args.json:
        write_json(args.json, {"benchmark": "transformer_pruning", "machine": machine_name(args.device),
                               "torch_pruning": torch_pruning_version(), "settings": vars(args),
                               "results": results})


if __name__ == "__main__":
    main()
