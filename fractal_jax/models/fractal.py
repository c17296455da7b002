"""FractalNet (Larsson, Maire, Shakhnarovich, ICLR 2017) as pure Flax linen modules.

`FractalBlock` walks a static `BlockSchedule`; every join is the mean of its surviving inputs, as
given by a drop-path plan that is drawn outside the model (`drop_path.sample`) and passed in.
With ``join="learned"`` the mean is weighted by a softmax over one learnable logit per join input
(taken over the survivors only). `column=c` runs network column c alone as a plain chain: only
that column's units are computed.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fractal_jax.checks import check_choice
from fractal_jax.config import BN_IMPLS, CONV_IMPLS, DROPOUT_IMPLS, POOL_IMPLS
from fractal_jax.models import drop_path
from fractal_jax.models.batch_norm import BatchNorm
from fractal_jax.models.dropout import hash_dropout
from fractal_jax.models.layers import ImageNetStem
from fractal_jax.models.conv import Conv
from fractal_jax.models.pool import max_pool_2x2
from fractal_jax.models.schedule import BlockSchedule, NetworkSchedule

# Caffe's "Xavier" filler is uniform with fan-in scaling (spec §1); the others are ablations.
INITS = {"xavier": nn.initializers.lecun_uniform(),
         "he": nn.initializers.he_normal(),
         "glorot": nn.initializers.glorot_uniform()}
default_kernel_init = INITS["xavier"]
DTYPES = ("float32", "bfloat16")

DROPOUT_POSITIONS = ("before_bn", "after_relu")
DROPOUT_TYPES = ("element", "channel")
JOIN_ORDERS = ("pool_then_join", "join_then_pool")
HEADS = ("dense", "gap")
STEMS = ("none", "imagenet")
JOINS = ("mean", "learned")


def input_weights(mask: jax.Array | None, logits: jax.Array) -> jax.Array:
    """Returns the weight of each join input: the softmax of `logits` over the surviving inputs.

    `mask` is (n,) for a per-batch plan, (batch, n) for a per-sample one, or None (all survive);
    the weights have its shape. A dropped input (mask entry 0) gets weight exactly 0, so with one
    survivor the join is that input and no gradient reaches the others or the logits. A mask
    that drops everything gives all-zero weights, not NaN. Equal logits give the plain mean.
    """
    if mask is None:
        return jax.nn.softmax(logits)
    keep = jnp.asarray(mask) > 0
    return jax.nn.softmax(jnp.broadcast_to(logits, keep.shape), where=keep)


def join(inputs: Sequence[jax.Array], mask: jax.Array | None = None,
         logits: jax.Array | None = None) -> jax.Array:
    """Returns the mean of the surviving inputs (mask entry 1), weighted by `input_weights`.

    Without `logits` it is the paper's plain mean (no 1/(1-p) rescaling, spec §1); with `logits`
    (n,) the weights are their softmax over the survivors (the learned join). `mask` has shape
    (n,) for a per-batch plan or (batch, n) for a per-sample plan; None means all survive.
    """
    stacked = jnp.stack(inputs)
    if logits is None:  # the plain mean is the weighted one with equal logits
        logits = jnp.zeros(len(inputs), jnp.float32)
    # (n,) -> (n, 1, 1, 1); a per-sample (batch, n) -> (n, batch, 1, 1, 1).
    weights = jnp.moveaxis(input_weights(mask, logits).astype(stacked.dtype), -1, 0)
    weights = weights.reshape(weights.shape + (1,) * (stacked.ndim - weights.ndim))
    return (stacked * weights).sum(axis=0)


class LearnedJoin(nn.Module):
    """A join with one learnable logit per input, initialised to 0 so that it starts as the mean."""

    @nn.compact
    def __call__(self, inputs: Sequence[jax.Array], mask: jax.Array | None = None) -> jax.Array:
        logits = self.param("logits", nn.initializers.zeros, (len(inputs),), jnp.float32)
        return join(inputs, mask, logits)


class ConvUnit(nn.Module):
    """3×3 conv (no bias) → BatchNorm → ReLU, with dropout before BN ([Caffe]) or after ReLU.

    BatchNorm keeps bias-corrected running statistics (`batch_norm.BatchNorm`, Caffe's rule,
    computed as `bn_impl` says); ``bn_bias_correction=False`` is flax's uncorrected
    `nn.BatchNorm`, as an ablation (it ignores `bn_impl`).
    """

    features: int
    dropout_rate: float = 0.0
    dropout_position: str = "before_bn"
    dropout_type: str = "element"
    bn_momentum: float = 0.9
    bn_affine: bool = True
    bn_bias_correction: bool = True
    kernel_init: Callable = default_kernel_init
    dtype: str = "float32"
    conv_impl: str = "auto"
    bn_impl: str = "auto"
    dropout_impl: str = "hash"

    def _dropout(self, x: jax.Array, train: bool) -> jax.Array:
        if self.dropout_rate == 0.0:
            return x
        broadcast = (1, 2) if self.dropout_type == "channel" else ()
        if self.dropout_impl == "hash":
            return hash_dropout(self.make_rng("dropout"), x, self.dropout_rate, broadcast) \
                if train else x
        return nn.Dropout(self.dropout_rate, broadcast_dims=broadcast, deterministic=not train)(x)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = Conv(self.features, kernel_init=self.kernel_init, dtype=self.dtype,
                 impl=self.conv_impl)(x)
        if self.dropout_position == "before_bn":
            x = self._dropout(x, train)
        # BatchNorm computes its statistics in float32 whatever `dtype` is.
        norm = (functools.partial(BatchNorm, impl=self.bn_impl) if self.bn_bias_correction
                else nn.BatchNorm)
        x = norm(use_running_average=not train, momentum=self.bn_momentum,
                 use_scale=self.bn_affine, use_bias=self.bn_affine, dtype=self.dtype,
                 name="BatchNorm_0")(x)
        x = nn.relu(x)
        if self.dropout_position == "after_relu":
            x = self._dropout(x, train)
        return x


def unit_name(column: int, position: int) -> str:
    return f"unit_c{column}_p{position}"


def join_name(position: int) -> str:
    return f"join_{position}"


class FractalBlock(nn.Module):
    """One fractal block: conv units on the schedule's grid, collapsed joins, optional pool.

    Joins are plain means, or `LearnedJoin`s named ``join_{position}`` when `learned_join`.
    """

    schedule: BlockSchedule
    unit: Callable[..., ConvUnit]
    pool: bool = True
    pool_then_join: bool = True
    learned_join: bool = False
    pool_impl: str = "windows"

    @nn.compact
    def __call__(self, x: jax.Array, masks: Sequence[jax.Array] | None = None,
                 column: int | None = None, train: bool = False) -> jax.Array:
        s = self.schedule
        live = range(1, s.num_columns + 1) if column is None else (column,)
        z = {k: x for k in live}
        joins = iter(zip(s.joins, masks if masks is not None else [None] * len(s.joins)))
        for p in range(1, s.depth + 1):
            cols = [k for k in s.columns_at(p) if k in z]
            for k in cols:
                z[k] = self.unit(name=unit_name(k, p))(z[k], train)
            if p % 2:
                continue
            _, mask = next(joins)
            if not cols:  # running one column that this join does not take
                continue
            inputs = [z[k] for k in cols]
            if self.pool and self.pool_then_join and p == s.depth:
                # The paper pools each column just before the block's final join.
                inputs = [max_pool_2x2(t, self.pool_impl) for t in inputs]
            if column is not None:
                y = inputs[0]
            elif self.learned_join:
                y = LearnedJoin(name=join_name(p))(inputs, mask)
            else:
                y = join(inputs, mask)
            z.update({k: y for k in cols})
        out = z[max(z)]
        if self.pool and not (self.pool_then_join and s.depth > 1):
            out = max_pool_2x2(out, self.pool_impl)
        return out


class Head(nn.Module):
    """Dense softmax classifier on the flattened final map (paper), or after global average pool."""

    num_classes: int
    kind: str = "dense"
    kernel_init: Callable = default_kernel_init
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.mean(axis=(1, 2)) if self.kind == "gap" else x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, kernel_init=self.kernel_init, dtype=self.dtype)(x)


class ConvNet(nn.Module):
    """What FractalNet and a plain chain of conv units share: per-block settings, stem, head.

    Blocks are followed by a 2×2 max-pool (the last one too unless `pool_last_block` is False,
    as for ImageNet where a GAP head follows a 7×7 map).
    """

    num_classes: int
    num_blocks: int = 5
    widths: tuple[int, ...] = (64, 128, 256, 512, 512)
    dropout: tuple[float, ...] | None = None
    dropout_position: str = "before_bn"
    dropout_type: str = "element"
    head: str = "dense"
    stem: str = "none"
    pool_last_block: bool = True
    bn_momentum: float = 0.9
    bn_affine: bool = True
    bn_bias_correction: bool = True
    weight_init: str = "xavier"
    dtype: str = "float32"
    remat: bool = False
    # How convolutions, 2×2 max-pools, BatchNorm and dropout are computed (models/conv.py,
    # pool.py, batch_norm.py, dropout.py): the defaults are the fastest measured; "xla",
    # "reduce_window", "autodiff" and "threefry" are the code before them ("slices": the
    # max-pool between them).
    conv_impl: str = "auto"
    pool_impl: str = "windows"
    bn_impl: str = "auto"
    dropout_impl: str = "hash"

    def __post_init__(self):
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {self.num_classes!r}.")
        if not isinstance(self.num_blocks, int) or self.num_blocks < 1:
            raise ValueError(f"num_blocks must be an integer >= 1, got {self.num_blocks!r}.")
        if len(self.widths) != self.num_blocks:
            raise ValueError(f"widths has {len(self.widths)} entries but there are "
                             f"{self.num_blocks} blocks; give one width per block.")
        if any(not isinstance(w, int) or w < 1 for w in self.widths):
            raise ValueError(f"widths must be positive integers, got {tuple(self.widths)}.")
        if len(self.dropout_rates) != self.num_blocks:
            raise ValueError(f"dropout has {len(self.dropout_rates)} entries but there are "
                             f"{self.num_blocks} blocks; give one rate per block (or None).")
        if any(not 0.0 <= d < 1.0 for d in self.dropout_rates):
            raise ValueError(f"dropout rates must be in [0, 1), got {self.dropout_rates}.")
        check_choice("dropout_position", self.dropout_position, DROPOUT_POSITIONS)
        check_choice("dropout_type", self.dropout_type, DROPOUT_TYPES)
        check_choice("head", self.head, HEADS)
        check_choice("stem", self.stem, STEMS)
        check_choice("weight_init", self.weight_init, tuple(INITS))
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("conv_impl", self.conv_impl, CONV_IMPLS)
        check_choice("pool_impl", self.pool_impl, POOL_IMPLS)
        check_choice("bn_impl", self.bn_impl, BN_IMPLS)
        check_choice("dropout_impl", self.dropout_impl, DROPOUT_IMPLS)
        super().__post_init__()

    @property
    def dropout_rates(self) -> tuple[float, ...]:
        return (0.0,) * self.num_blocks if self.dropout is None else tuple(map(float, self.dropout))

    @property
    def downsampling(self) -> int:
        """Total spatial reduction: the input size must be a multiple of it."""
        pools = self.num_blocks - (0 if self.pool_last_block else 1)
        return 2 ** pools * (4 if self.stem == "imagenet" else 1)

    def pools_after(self, block: int) -> bool:
        return block < self.num_blocks - 1 or self.pool_last_block

    def check_input(self, x: jax.Array) -> None:
        name = type(self).__name__
        if x.ndim != 4:
            raise ValueError(f"{name} expects NHWC images of rank 4, got shape {x.shape}.")
        h, w = x.shape[1:3]
        f = self.downsampling
        if h % f or w % f:
            raise ValueError(
                f"{name}: input size {h}x{w} cannot be divided by its pools (factor {f}); "
                f"resize or pad the input to a multiple of {f}, or use fewer blocks.")

    def unit_factory(self, block: int) -> Callable[..., ConvUnit]:
        return functools.partial(ConvUnit, self.widths[block],
                                 dropout_rate=self.dropout_rates[block],
                                 dropout_position=self.dropout_position,
                                 dropout_type=self.dropout_type, bn_momentum=self.bn_momentum,
                                 bn_affine=self.bn_affine,
                                 bn_bias_correction=self.bn_bias_correction,
                                 kernel_init=INITS[self.weight_init],
                                 dtype=self.dtype, conv_impl=self.conv_impl,
                                 bn_impl=self.bn_impl, dropout_impl=self.dropout_impl)

    def apply_stem(self, x: jax.Array, train: bool) -> jax.Array:
        self.check_input(x)
        if self.stem == "imagenet":
            x = ImageNetStem(64, self.bn_momentum, INITS[self.weight_init], self.dtype,
                             name="stem")(x, train=train)
        return x

    def block_class(self, cls: type[nn.Module], static_argnums: tuple[int, ...]) -> type[nn.Module]:
        """`cls`, rematerialised when `remat` is set: only each block's input is kept for the
        backward pass and the rest is recomputed (argument 0 is the module itself)."""
        return nn.remat(cls, static_argnums=static_argnums) if self.remat else cls

    def apply_head(self, x: jax.Array) -> jax.Array:
        return Head(self.num_classes, self.head, INITS[self.weight_init], self.dtype, name="head")(x)


class FractalNet(ConvNet):
    """B fractal blocks (each with its own column count, width and dropout rate) and a classifier.

    Call as ``model.apply(variables, x, train=..., plan=..., column=...)``:
      - ``plan``: a drop-path plan (see `drop_path`), used only when ``train`` is True; None or
        `full_plan` means every join takes all its inputs, as it always does in eval mode.
      - ``column``: run network column c (1 = shallowest) alone, in either mode.
      - ``features=True`` returns each block's output (after its pool) instead of logits.

    ``join``: "mean" (the paper) or "learned", a `LearnedJoin` at every join: the mean of the
    surviving inputs weighted by a softmax over learnable per-input logits.
    """

    num_columns: int | tuple[int, ...] = 3
    join_order: str = "pool_then_join"
    join: str = "mean"

    def __post_init__(self):
        check_choice("join_order", self.join_order, JOIN_ORDERS)
        check_choice("join", self.join, JOINS)
        super().__post_init__()
        self.network_schedule  # validates num_columns against num_blocks

    @property
    def network_schedule(self) -> NetworkSchedule:
        return NetworkSchedule.create(self.num_columns, self.num_blocks)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, plan=None, column: int | None = None,
                 features: bool = False):
        schedule = self.network_schedule
        if column is not None:
            schedule.block_column(0, column)  # range check with a clear message
        if not train or plan is None:
            plan = (None,) * self.num_blocks
        elif len(plan) != self.num_blocks:
            raise ValueError(f"plan has {len(plan)} blocks but the model has {self.num_blocks}; "
                             "draw it with drop_path.sample(key, model.network_schedule, ...).")
        x = self.apply_stem(x, train)
        block_cls = self.block_class(FractalBlock, static_argnums=(3, 4))  # column, train
        outputs = []
        for b, block in enumerate(schedule.blocks):
            x = block_cls(block, self.unit_factory(b), pool=self.pools_after(b),
                             pool_then_join=self.join_order == "pool_then_join",
                             learned_join=self.join == "learned", pool_impl=self.pool_impl,
                             name=f"block_{b}")(
                x, plan[b], None if column is None else schedule.block_column(b, column), train)
            outputs.append(x)
        return tuple(outputs) if features else self.apply_head(x)


def keep_live_batch_stats(model: FractalNet, new: dict, old: dict, plan) -> dict:
    """`new` BatchNorm statistics, except that units the `plan` leaves dead keep `old`.

    A dead unit's output never reaches the loss, so the statistics after a step that computes
    and masks it equal those of a step that skips it (training/programs.py) only if its
    statistics do not move either: the plan decides what was trained, not what happened to run.
    Under a per-sample plan a unit is dead when it is dead for every example.
    """
    schedule = model.network_schedule
    if drop_path.is_per_sample(plan):
        per_example = jax.vmap(lambda p: drop_path.live_units(p, schedule))(plan)
        units = jax.tree.map(lambda alive: alive.any(0), per_example)
    else:
        units = drop_path.live_units(plan, schedule)
    stats = dict(new)
    for b, live in enumerate(units):
        name = f"block_{b}"
        block = dict(new[name])
        for (k, p), alive in live.items():
            unit = unit_name(k, p)
            block[unit] = jax.tree.map(lambda n, o, a=alive: jnp.where(a, n, o),
                                       new[name][unit], old[name][unit])
        stats[name] = block
    return stats
