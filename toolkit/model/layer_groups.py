"""Layer groups: ordered slices of a backbone, the unit of ``--freeze N``.

A :class:`LayerGroup` shares (never copies) some sub-modules of a backbone and, where a
parameter sits directly on a container (a class token, a position embedding), that
parameter. Helpers here build groups from parameter names or by splitting a network where
its resolution drops, and check that every parameter belongs to exactly one group. Generic:
backbone plugins (built-in or third-party) use them, the core knows no concrete model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from torch import nn


class LayerGroup(nn.Module):
    """A view on part of a backbone: ``parameters()`` and ``modules()`` reach the shared
    members, so freezing a group or putting its norm layers in eval mode acts on the
    backbone itself. Not callable; ``members`` lists the qualified names it covers."""

    def __init__(self, name: str, modules: Sequence[tuple[str, nn.Module]] = (),
                 params: Sequence[tuple[str, nn.Parameter]] = ()):
        super().__init__()
        self.group_name = name
        self.members = [n for n, _ in modules] + [n for n, _ in params]
        for qname, module in modules:
            self.add_module(_slot(qname, self), module)
        for qname, param in params:
            self.register_parameter(_slot(qname, self), param)

    def forward(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"layer group '{self.group_name}' is a view for freezing, "
                           "not a callable module")

    def extra_repr(self) -> str:
        return f"name={self.group_name!r}"


def _slot(qname: str, group: nn.Module) -> str:
    base = qname.replace(".", "_") or "root"
    slot, i = base, 1
    while slot in group._modules or slot in group._parameters:
        i += 1
        slot = f"{base}_{i}"
    return slot


def _label(members: Sequence[str]) -> str:
    if not members:
        return "empty"
    return members[0] if len(members) == 1 else f"{members[0]}..{members[-1]}"


def groups_from_param_names(model: nn.Module, groups: Sequence[Iterable[str]],
                            names: Sequence[str] | None = None) -> list[LayerGroup]:
    """One :class:`LayerGroup` per list of parameter names (ordered input -> output).

    Each group holds the largest sub-modules whose parameters all belong to it, plus loose
    parameters of containers split between groups. Empty groups are dropped. Raises
    ``ValueError`` when a parameter of ``model`` is in no group or in two.
    """
    params = dict(model.named_parameters())
    owner: dict[int, int] = {}
    for gi, group in enumerate(groups):
        for pname in group:
            if pname not in params:
                raise ValueError(f"layer group {gi} names unknown parameter {pname!r}")
            pid = id(params[pname])
            if pid in owner and owner[pid] != gi:
                raise ValueError(f"parameter {pname!r} is in layer groups {owner[pid]} and {gi}")
            owner[pid] = gi
    lost = [n for n, p in params.items() if id(p) not in owner]
    if lost:
        raise ValueError(f"parameters in no layer group: {', '.join(lost[:5])}")

    n = len(groups)
    modules: list[list[tuple[str, nn.Module]]] = [[] for _ in range(n)]
    loose: list[list[tuple[str, nn.Parameter]]] = [[] for _ in range(n)]

    def visit(module: nn.Module, prefix: str) -> None:
        owners = {owner[id(p)] for p in module.parameters()}
        if not owners:
            return
        if len(owners) == 1 and prefix:
            modules[owners.pop()].append((prefix, module))
            return
        for pname, p in module.named_parameters(recurse=False):
            loose[owner[id(p)]].append((f"{prefix}.{pname}" if prefix else pname, p))
        for cname, child in module.named_children():
            visit(child, f"{prefix}.{cname}" if prefix else cname)

    visit(model, "")
    out = []
    for gi in range(n):
        if not modules[gi] and not loose[gi]:
            continue
        members = [m for m, _ in modules[gi]] + [p for p, _ in loose[gi]]
        label = names[gi] if names is not None else _label(members)
        out.append(LayerGroup(label, modules[gi], loose[gi]))
    return out


def check_layer_groups(model: nn.Module, groups: Sequence[nn.Module]) -> None:
    """Raise ``ValueError`` unless every parameter of ``model`` is in exactly one group and
    the groups hold no other parameter."""
    own = {id(p): n for n, p in model.named_parameters()}
    seen: dict[int, int] = {}
    for gi, group in enumerate(groups):
        for p in group.parameters():
            if id(p) not in own:
                raise ValueError(f"layer group {gi} holds a parameter that is not the model's")
            if id(p) in seen:
                raise ValueError(f"parameter {own[id(p)]!r} is in layer groups {seen[id(p)]} "
                                 f"and {gi}")
            seen[id(p)] = gi
    lost = [n for pid, n in own.items() if pid not in seen]
    if lost:
        raise ValueError(f"parameters in no layer group: {', '.join(lost[:5])}")


# -- splitting a network where its resolution drops --------------------------------------

def sequential_units(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Children in registration order, with ``nn.Sequential`` / ``nn.ModuleList`` containers
    opened up (recursively): the smallest units a split may fall between. A short sequence
    of plain layers (conv + norm + activation, norm + strided conv) stays one unit."""
    for name, child in module.named_children():
        qname = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.ModuleList) or (
                isinstance(child, nn.Sequential) and not _short_layer_sequence(child)):
            yield from sequential_units(child, qname)
        else:
            yield qname, child


def _short_layer_sequence(seq: nn.Sequential) -> bool:
    children = list(seq.children())
    return len(children) <= 3 and all(next(c.children(), None) is None for c in children)


def _stride(value: object) -> int:
    if isinstance(value, (tuple, list)):
        return max((int(v) for v in value), default=1)
    return int(value) if isinstance(value, int) else 1


def downsamples(module: nn.Module) -> bool:
    """Whether a unit reduces spatial resolution: a strided convolution or pooling, or a
    patch-merging layer, anywhere inside it."""
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd) and _stride(m.stride) > 1:
            return True
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) and _stride(m.stride) > 1:
            return True
        if "PatchMerging" in type(m).__name__:
            return True
    return False


def has_params(units: Iterable[tuple[str, nn.Module]]) -> bool:
    return any(True for _, m in units for _ in m.parameters())


def split_at_downsampling(units: Sequence[tuple[str, nn.Module]]
                          ) -> list[list[tuple[str, nn.Module]]]:
    """Consecutive units grouped into stages: a new stage starts at each unit that lowers the
    resolution, once the current stage holds parameters (so a lone pooling layer joins the
    next stage)."""
    stages: list[list[tuple[str, nn.Module]]] = [[]]
    for name, unit in units:
        if downsamples(unit) and has_params(stages[-1]):
            stages.append([])
        stages[-1].append((name, unit))
    return stages


def param_names(model_prefix_units: Iterable[tuple[str, nn.Module]]) -> list[str]:
    """Qualified parameter names of some units (``unit.param``)."""
    return [f"{q}.{n}" for q, m in model_prefix_units for n, _ in m.named_parameters()]


def groups_from_units(model: nn.Module, stages: Sequence[Sequence[tuple[str, nn.Module]]],
                      names: Sequence[str] | None = None) -> list[LayerGroup]:
    """Layer groups from stages of units. Parameters sitting directly on a container (not
    inside any unit) join the group of the first unit under that container (else the first
    group)."""
    groups = [param_names(stage) for stage in stages]
    covered = {n for g in groups for n in g}
    for pname, _ in model.named_parameters():
        if pname in covered:
            continue
        container = pname.rpartition(".")[0]
        target = 0
        for gi, stage in enumerate(stages):
            if any(not container or q.startswith(container + ".") for q, _ in stage):
                target = gi
                break
        groups[target].append(pname)
    keep = [i for i, g in enumerate(groups) if g]
    return groups_from_param_names(
        model, [groups[i] for i in keep],
        names=[names[i] for i in keep] if names is not None else None)
