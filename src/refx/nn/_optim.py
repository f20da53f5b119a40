"""nn.Optimizer: an optax optimizer whose state lives in Refs.

``Optimizer(model, tx, wrt=nn.Param)`` selects the model's Refs with ``wrt``
(any refx filter: a Ref class, a collection name, a path filter,
combinators) and runs ``tx.init`` on their values, keyed by their names
(``state_dict`` names: ``"encoder/kernel"``; a tied Ref once, under its first
path).  Every array of the optax state is held in a Ref of its own
(``nn.OptState``), so donation and sharding see each moment separately, and
a moment whose shape is its parameter's takes the parameter's declared
``sharding``.  ``step`` counts updates.

``optimizer.update(model, grads)`` takes the gradient Partition of
``refx.grad(loss, wrt=...)`` (or ``refx.value_and_grad``) with the same
filter, computes optax's updates and writes parameters and state, all or
nothing (``update_refs``); eagerly or inside ``refx.jit`` (pass the
optimizer and the model to the jitted step).
"""

from __future__ import annotations

from typing import Any, cast

import jax
import jax.numpy as jnp

from .. import NOTHING, Index, Ref, Value, get_partition, update_refs
from ._module import Module
from ._refs import OptState, Param


def _named_refs(model: Any, wrt: Any) -> dict[str, Any]:
    """{name: Ref} of the Refs `wrt` selects, each once, at its first path."""
    out: dict[str, Any] = {}
    seen: set[int] = set()
    for path, r in get_partition(model, wrt).items():
        if r is NOTHING or not isinstance(r, Ref) or id(r) in seen:
            continue
        seen.add(id(r))
        out["/".join(path)] = r
    return out


def _present(model: Any) -> str:
    counts: dict[str, int] = {}
    for r in deref_refs(model):
        key = f"{type(r).__name__}({r.collection!r})"
        counts[key] = counts.get(key, 0) + 1
    if not counts:
        return "no Refs at all"
    return ", ".join(f"{n} x {k}" for k, n in counts.items())


def deref_refs(model: Any) -> list[Any]:
    seen: set[int] = set()
    out = []
    for r in jax.tree_util.tree_leaves(get_partition(model, Ref)):
        if isinstance(r, Ref) and id(r) not in seen:
            seen.add(id(r))
            out.append(r)
    return out


def _grads_by_name(grads: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, g in grads.items():
        if g is NOTHING or isinstance(g, Index):
            continue
        name = "/".join(path)
        if name in out:
            continue
        out[name] = g.value if isinstance(g, Value) else g
    return out


class Optimizer(Module):
    """An optax optimizer for the ``wrt`` Refs of a model, its state in Refs."""

    def __init__(self, model: Any, tx: Any, *, wrt: Any = Param) -> None:
        refs = _named_refs(model, wrt)
        if not refs:
            raise ValueError(
                f"Optimizer: wrt={wrt!r} matches no Ref of this {type(model).__name__}; "
                f"it holds {_present(model)}"
            )
        self.tx = tx
        self.wrt = wrt
        self.names = tuple(refs)
        params = {k: r.value for k, r in refs.items()}
        state = tx.init(params)
        shardings = {k: r.metadata.get("sharding") for k, r in refs.items()}

        def wrap(path: Any, x: Any) -> Any:
            if not isinstance(x, jax.Array):
                return x
            md = {}
            for k in path:
                name = getattr(k, "key", None)
                if isinstance(name, str) and name in refs:
                    if shardings[name] is not None and x.shape == refs[name].value.shape:
                        md["sharding"] = shardings[name]
                    break
            return OptState(x, **md)

        self.opt_state = jax.tree_util.tree_map_with_path(wrap, state)
        self.step = OptState(jnp.array(0, jnp.uint32))

    def update(self, model: Any, grads: Any, **kwargs: Any) -> None:
        """Apply one optax step: ``grads`` is the Partition of
        ``refx.grad(..., wrt=self.wrt)``; extra keywords go to ``tx.update``."""
        import optax  # type: ignore[import-untyped,unused-ignore]

        refs = _named_refs(model, self.wrt)
        if tuple(refs) != self.names:
            raise ValueError(
                f"Optimizer.update: the model's Refs selected by wrt={self.wrt!r} are not the "
                f"ones the optimizer was made for: made for {list(self.names)}, the model has "
                f"{list(refs)}"
            )
        g = _grads_by_name(grads)
        if set(g) != set(refs):
            missing = sorted(set(refs) - set(g))
            extra = sorted(set(g) - set(refs))
            raise ValueError(
                f"Optimizer.update: the gradients do not match the parameters (wrt={self.wrt!r}):"
                f" missing {missing}, unexpected {extra}; take them with "
                f"refx.grad(..., wrt={self.wrt!r})"
            )
        params = {k: r.value for k, r in refs.items()}
        leaves, treedef = jax.tree_util.tree_flatten(
            self.opt_state, is_leaf=lambda x: isinstance(x, Ref))
        treedef = cast(Any, treedef)
        state = treedef.unflatten([r.value if isinstance(r, Ref) else r for r in leaves])
        grads_d = {k: g[k] for k in refs}
        updates, new_state = self.tx.update(grads_d, state, params, **kwargs)
        new_params = optax.apply_updates(params, updates)
        new_leaves = treedef.flatten_up_to(new_state)
        targets = [r for r in leaves if isinstance(r, Ref)]
        sources = [v for r, v in zip(leaves, new_leaves, strict=True) if isinstance(r, Ref)]
        targets += list(refs.values()) + [self.step]
        sources += [new_params[k] for k in refs] + [self.step.value + 1]
        update_refs(targets, sources)
