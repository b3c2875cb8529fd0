"""Selectors: which layer blocks the server averages (shared) and which each client keeps (personal).

A selector is a list of include patterns minus a list of exclude patterns, each pattern one of

- a glob on block names (``fnmatch``, case-sensitive; ``*`` also crosses dots): ``layer1.*``, ``fc*``, ``*``
- ``re:<regex>``, full match on block names: ``re:layer[12]\\..*``
- ``type:<ModuleClass>``, blocks whose module is (a subclass of) that class: ``type:BatchNorm2d``;
  ``type:norm`` is every normalization layer
- ``group:<name>`` or a bare ``head`` / ``body`` / ``norm``: the model's named groups

Resolving a selector against a model gives the shared and personal blocks and state-dict keys; integer
buffers such as ``num_batches_tracked`` travel with their module's block.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from fedlayer.config import ConfigError
from fedlayer.models import GROUPS, block_modules, model_blocks, model_groups, model_name

KIND_HELP = "use a glob (e.g. 'fc*'), 're:<regex>', 'type:<ModuleClass>' or 'group:<head|body|norm>'"


class SelectorError(ConfigError):
    """A selector that cannot be resolved against a model; the message is one line naming the field."""


@dataclass(frozen=True)
class Selector:
    """Shared blocks = blocks matching any ``include`` pattern and no ``exclude`` pattern.

    Parameters
    ----------
    include : Sequence[str]
        Patterns of the shared blocks; empty = nothing shared.
    exclude : Sequence[str]
        Patterns of blocks kept personal even if included.
    """

    include: Sequence[str] = ()
    exclude: Sequence[str] = ()

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            if isinstance(patterns, str):  # a bare string would silently become one pattern per character
                raise TypeError(
                    f"Selector.{name} must be a sequence of patterns, not the string {patterns!r}"
                )
            object.__setattr__(self, name, tuple(patterns))


@dataclass(frozen=True)
class _ModelView:
    """What patterns are matched against: block names, their modules and the model's groups."""

    name: str
    blocks: dict[str, list[str]]
    modules: dict[str, nn.Module]
    groups: dict[str, list[str]]
    params: dict[str, int]  # parameter elements per block (buffers not counted)

    @classmethod
    def of(cls, model: nn.Module) -> _ModelView:
        blocks = model_blocks(model)
        numels = {key: p.numel() for key, p in model.named_parameters()}
        params = {block: sum(numels.get(key, 0) for key in keys) for block, keys in blocks.items()}
        return cls(model_name(model), blocks, block_modules(model), model_groups(model), params)

    def block_types(self) -> str:
        return ", ".join(sorted({type(module).__name__ for module in self.modules.values()}))


def _type_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def _match_one(pattern: str, view: _ModelView, field: str) -> tuple[list[str], str]:
    """Blocks matching ``pattern`` and the hint to print if there are none."""
    kind, sep, arg = pattern.partition(":")
    if pattern in GROUPS or (sep and kind == "group"):
        return _match_group(arg if sep else pattern, view, field)
    if sep and kind == "type":
        if arg == "norm":
            return _match_group("norm", view, field)
        matched = [block for block, module in view.modules.items() if arg in _type_names(module)]
        return matched, f"block types are: {view.block_types()}"
    if sep and kind == "re":
        try:
            regex = re.compile(arg)
        except re.error as err:
            raise SelectorError(
                f"{field}: pattern {pattern!r} is not a valid regular expression ({err})"
            ) from None
        matched = [block for block in view.blocks if regex.fullmatch(block)]
    elif sep:  # block names never contain ':', so this is a misspelt kind, not a glob
        raise SelectorError(f"{field}: pattern {pattern!r} has an unknown kind {kind + ':'!r}; {KIND_HELP}")
    else:
        matched = [block for block in view.blocks if fnmatch.fnmatchcase(block, pattern)]
    return matched, f"blocks are: {', '.join(view.blocks)}"


def _match_group(group: str, view: _ModelView, field: str) -> tuple[list[str], str]:
    if group not in GROUPS:
        raise SelectorError(f"{field}: unknown group {group!r}; groups are: {', '.join(GROUPS)}")
    return view.groups[group], f"its group {group!r} is empty"


def _match_all(patterns: Iterable[str], view: _ModelView, field: str) -> set[str]:
    """Union of the blocks every pattern matches; a pattern matching nothing is an error (likely a typo)."""
    matched: set[str] = set()
    for pattern in patterns:
        blocks, hint = _match_one(pattern, view, field)
        if not blocks:
            raise SelectorError(f"{field}: pattern {pattern!r} matches no block of {view.name}; {hint}")
        matched.update(blocks)
    return matched


def _list(names: Sequence[str]) -> str:
    return ", ".join(names) or "none"


@dataclass(frozen=True)
class Resolution:
    """A selector resolved against one model: shared and personal blocks and keys, in state-dict order."""

    model: str
    selector: Selector
    shared_blocks: list[str]
    personal_blocks: list[str]
    shared_keys: list[str]
    personal_keys: list[str]
    shared_params: int
    personal_params: int
    blocks: dict[str, list[str]] = dataclasses.field(repr=False)

    def describe(self) -> str:
        """Two human-readable lines: the shared and the personal blocks with their sizes."""
        return "\n".join(
            f"{side} ({len(blocks)} block{'s' * (len(blocks) != 1)}, {params:,} params): {_list(blocks)}"
            for side, blocks, params in (
                ("shared", self.shared_blocks, self.shared_params),
                ("personal", self.personal_blocks, self.personal_params),
            )
        )

    def to_json(self) -> dict[str, Any]:
        """Everything as JSON-serializable values (for ``layers.json``)."""
        return {
            "model": self.model,
            "include": list(self.selector.include),
            "exclude": list(self.selector.exclude),
            "shared_blocks": self.shared_blocks,
            "personal_blocks": self.personal_blocks,
            "shared_keys": self.shared_keys,
            "personal_keys": self.personal_keys,
            "shared_params": self.shared_params,
            "personal_params": self.personal_params,
            "blocks": self.blocks,
        }


def resolve(
    selector: Selector,
    model: nn.Module,
    *,
    field: str = "strategy.shared",
    exclude_field: str = "strategy.exclude",
) -> Resolution:
    """Resolve ``selector`` against ``model``'s blocks.

    Parameters
    ----------
    selector : Selector
        Include and exclude patterns.
    model : nn.Module
        A model defining ``HEAD_BLOCKS`` (every model of ``fedlayer.models`` does).
    field, exclude_field : str
        Config keys named in errors about include and exclude patterns.

    Raises
    ------
    SelectorError
        A pattern matches no block, names an unknown group / kind, is an invalid regex, or is both
        included and excluded.
    """
    view = _ModelView.of(model)
    for pattern in selector.exclude:
        if pattern in selector.include:
            conflict = f"pattern {pattern!r} is also in {field}; a pattern cannot be both shared and excluded"
            raise SelectorError(f"{exclude_field}: {conflict}")
    shared = _match_all(selector.include, view, field) - _match_all(selector.exclude, view, exclude_field)
    shared_blocks = [block for block in view.blocks if block in shared]
    personal_blocks = [block for block in view.blocks if block not in shared]
    return Resolution(
        model=view.name,
        selector=selector,
        shared_blocks=shared_blocks,
        personal_blocks=personal_blocks,
        shared_keys=[key for block in shared_blocks for key in view.blocks[block]],
        personal_keys=[key for block in personal_blocks for key in view.blocks[block]],
        shared_params=sum(view.params[block] for block in shared_blocks),
        personal_params=sum(view.params[block] for block in personal_blocks),
        blocks=view.blocks,
    )
