"""The method registry: every method by name, with its kind, knobs and grid.

One list, read by the examples' ``--method``, the compress CLI
(``python -m ec2t_jax.compress``) and the tests (the contract suite runs every
registered method). Public accessors: :func:`~ec2t_jax.method_registry`,
:func:`~ec2t_jax.get_method`, :func:`~ec2t_jax.register_method`.

Adding a method = one module + one registration. In the method's module
(see ``_src/core/protocol.py`` for writing the method itself)::

  from ec2t_jax._src.methods._support import grids, registry

  def quantizer(factor=0.7, *, selection=None) -> core.Quantizer: ...
  def mine(factor=0.7, *, selection=None):        # public: the optax transformation
    return quantizer(factor, selection=selection).transform()

  registry.register_method(registry.MethodSpec(
      name="mine", kind="train", quantizer=quantizer, transform=mine,
      knobs={"factor": registry.Knob(core.Range(0.0, low_open=True),
                                     sweep=(0.5, 0.7, 0.9), traced=True)},
      grid=lambda options: grids.ternary_grid()))

A knob's default is the ``quantizer``'s (read from its signature, as optax's
common test reads its transformations' defaults), so it is written once; the
contract suite (``tests/methods/test_contract.py``) checks that the knobs are
exactly the quantizer's keyword parameters (``selection`` and the one-shot
``inputs`` aside) and that the public function has the same defaults.

and add the module to :data:`BUILTIN_MODULES` (a built-in method) or import
it before use (a user's method); registration happens at import, and the
registry imports every built-in module before it answers, so it is complete
whatever was imported first.

Kinds:

* ``"train"``: the last transformation of an optax chain, on its grid after
  every step from ``last_phase`` on (0 for most; Faraone et al.: 1).
* ``"staged"``: stages advance by phase (or ``steps_per_stage``); every
  selected weight is on the grid from phase ``last_phase(options, layers)``.
* ``"one_shot"``: post-training; ``quantizer(**knobs, **inputs).instant(params)``
  is the method (its ``.transform()`` trains from there where meaningful).
  ``inputs`` names what it needs beyond knobs (``key``; ``apply_fn`` and
  ``calibration_data``).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
from typing import Any, Callable, Mapping, Optional

from ec2t_jax._src import core
from ec2t_jax._src.methods._support import grids

KINDS = ("train", "staged", "one_shot")


_UNSET = object()


@dataclasses.dataclass(frozen=True)
class Knob:
  """One keyword argument of a method's factory (its ``quantizer``).

  Attributes:
    valid: a :class:`~core.Range` for numbers, a tuple of choices, a type
      (the value is an instance of it or None), or None (the factory checks
      it).
    sweep: values a benchmark sweeps (a sensible spread around the default).
    traced: the knob is a numeric hyperparameter that may be traced
      (``optax.inject_hyperparams``), checked and guarded at every update.
    doc: one line.
    default: the factory's default, read from its signature when the
      :class:`MethodSpec` is made (not an argument).

  Raises:
    TypeError: ``valid`` of another kind (e.g. a number: the default is not
      written here but read from the factory).
  """
  valid: Any = None
  sweep: tuple = ()
  traced: bool = False
  doc: str = ""
  default: Any = dataclasses.field(default=_UNSET, init=False)

  def __post_init__(self):
    if not (self.valid is None or isinstance(self.valid, (core.Range, tuple, type))):
      raise TypeError(f"Knob.valid must be a core.Range, a tuple of choices, a type or None, "
                      f"got {self.valid!r} (a knob's default is read from the factory's "
                      "signature, not written in the Knob)")
    if not isinstance(self.sweep, tuple):
      raise TypeError(f"Knob.sweep must be a tuple, got {self.sweep!r}")

  def with_default(self, default) -> "Knob":
    """This knob with its factory's ``default``."""
    knob = dataclasses.replace(self)
    object.__setattr__(knob, "default", default)
    return knob

  def check(self, name: str, value) -> None:
    """Raises ``ValueError`` naming ``name`` if a concrete ``value`` is not valid."""
    if isinstance(self.valid, core.Range):
      if value is not None:
        core.check_range(name, value, self.valid)
    elif isinstance(self.valid, tuple):
      core.check_choice(name, value, self.valid)
    elif isinstance(self.valid, type) and not (value is None or isinstance(value, self.valid)):
      raise ValueError(f"{name} must be a {self.valid.__name__} or None, got {value!r}")


def signature_defaults(factory: Callable, names) -> dict[str, Any]:
  """The defaults of ``factory``'s parameters ``names``, from its signature.

  Raises:
    ValueError: a name that is not a parameter of ``factory``, or has no default.
  """
  parameters = inspect.signature(factory).parameters
  defaults = {}
  for name in names:
    parameter = parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
      raise ValueError(f"knob {name!r} is not a keyword parameter with a default of "
                       f"{getattr(factory, '__qualname__', factory)!r}")
    defaults[name] = parameter.default
  return defaults


def _no_stages(options, num_layers) -> int:
  del options, num_layers
  return 0


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """A registered method.

  Attributes:
    name: the registry key (``--method`` of the examples).
    kind: ``"train"``, ``"staged"`` or ``"one_shot"`` (module docstring).
    quantizer: ``(**knobs, selection=None, **inputs) -> core.Quantizer``.
    knobs: name -> :class:`Knob` (the quantizer's keyword arguments; each
      knob's default is read from ``quantizer``'s signature).
    grid: ``options -> grids.Grid`` (``options``: every knob's value).
    transform: the public transformation function taking the knobs by name
      (what ``optax.inject_hyperparams`` wraps); default
      ``quantizer(...).transform()``.
    one_shot: the public one-shot function (``ec2t.mcq``), if any.
    last_phase: ``(options, number of selected layers) -> phase`` from which
      every selected weight is on the grid.
    inputs: one-shot inputs beyond the knobs (``"key"``, ``"apply_fn"``,
      ``"calibration_data"``).
    description: one line.
    regularizer: a loss term the method adds in its first phase (Faraone et
      al.'s ``sparsity_regularizer``): ``regularizer(**options, selection=...)
      -> (params -> scalar)``, where ``options`` are its own
      ``regularizer_knobs`` and the method's knobs of the same names.
    regularizer_knobs: name -> :class:`Knob` of ``regularizer``'s own keyword
      arguments.
  """
  name: str
  kind: str
  quantizer: Callable[..., core.Quantizer]
  knobs: Mapping[str, Knob]
  grid: Callable[[Mapping[str, Any]], grids.Grid]
  transform: Optional[Callable[..., Any]] = None
  one_shot: Optional[Callable[..., Any]] = None
  last_phase: Callable[[Mapping[str, Any], int], int] = _no_stages
  inputs: tuple = ()
  description: str = ""
  regularizer: Optional[Callable[..., Callable[[Any], Any]]] = None
  regularizer_knobs: Mapping[str, Knob] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"MethodSpec.kind must be one of {KINDS}, got {self.kind!r}")
    if not self.name or not isinstance(self.name, str):
      raise ValueError(f"MethodSpec.name must be a non-empty string, got {self.name!r}")
    defaults = signature_defaults(self.quantizer, self.knobs)
    knobs = {name: knob.with_default(defaults[name]) for name, knob in self.knobs.items()}
    object.__setattr__(self, "knobs", types.MappingProxyType(knobs))
    defaults = signature_defaults(self.regularizer, self.regularizer_knobs) if (
        self.regularizer is not None) else {}
    object.__setattr__(self, "regularizer_knobs", types.MappingProxyType(
        {name: knob.with_default(defaults[name])
         for name, knob in self.regularizer_knobs.items()}))

  def options(self, **overrides) -> dict[str, Any]:
    """Every knob's value: the defaults with ``overrides``, each checked by name.

    Raises:
      ValueError: an unknown knob, or a value outside its valid range.
    """
    unknown = sorted(set(overrides) - set(self.knobs))
    if unknown:
      raise ValueError(f"method {self.name!r} has no knob {unknown[0]!r} "
                       f"(knobs: {', '.join(sorted(self.knobs)) or 'none'})")
    options = {name: knob.default for name, knob in self.knobs.items()}
    options.update(overrides)
    for name, value in overrides.items():
      self.knobs[name].check(name, value)
    return options

  def build(self, *, selection=None, **knobs_and_inputs) -> core.Quantizer:
    """The method's :class:`~core.Quantizer` (knobs checked by name)."""
    knobs = {k: v for k, v in knobs_and_inputs.items() if k not in self.inputs}
    inputs = {k: v for k, v in knobs_and_inputs.items() if k in self.inputs}
    return self.quantizer(**self.options(**knobs), **inputs, selection=selection)

  def make_transform(self, *, selection=None, **knobs):
    """The method as an optax transformation (the public function where there is one)."""
    if self.transform is not None and not self.inputs:
      self.options(**knobs)
      return self.transform(**knobs, selection=selection)
    return self.build(selection=selection, **knobs).transform()

  def grid_for(self, **options) -> grids.Grid:
    """The :class:`~grids.Grid` of the method with these knobs (defaults elsewhere)."""
    return self.grid(self.options(**options))


_REGISTRY: dict[str, MethodSpec] = {}

# The built-in methods: one line each. Each module registers its method(s) at import.
BUILTIN_MODULES = (
    "ec2t_jax._src.methods.ec2t.chain",
    "ec2t_jax._src.methods.twn",
    "ec2t_jax._src.methods.ttq",
    "ec2t_jax._src.methods.sttn",
    "ec2t_jax._src.methods.bitnet",
    "ec2t_jax._src.methods.paretoq",
    "ec2t_jax._src.methods.sparsity_regularization",
    "ec2t_jax._src.methods.inq",
    "ec2t_jax._src.methods.slq",
    "ec2t_jax._src.methods.mcq",
    "ec2t_jax._src.methods.calibrated_pruning.method",
)


def _load_builtins() -> None:
  for module in BUILTIN_MODULES:
    importlib.import_module(module)


def register_method(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
  """Adds ``spec`` under ``spec.name``; a second method of that name is an error unless ``replace``."""
  if not isinstance(spec, MethodSpec):
    raise TypeError(f"register_method takes a MethodSpec, got {type(spec).__name__}")
  if spec.name in _REGISTRY and not replace:
    raise ValueError(f"a method named {spec.name!r} is already registered "
                     "(pass replace=True to replace it)")
  _REGISTRY[spec.name] = spec
  return spec


def unregister_method(name: str) -> None:
  """Removes a method (tests that register their own)."""
  _REGISTRY.pop(name, None)


def get_method(name: str) -> MethodSpec:
  """The :class:`MethodSpec` registered as ``name``.

  Example:
    >>> from ec2t_jax import get_method
    >>> get_method("twn").kind
    'train'
  """
  _load_builtins()
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f"no method named {name!r}; registered: "
                     f"{', '.join(sorted(_REGISTRY))}") from None


def method_registry(kind: Optional[str] = None) -> dict[str, MethodSpec]:
  """Every registered method by name (only those of ``kind`` if given), sorted.

  Example:
    >>> from ec2t_jax import method_registry
    >>> sorted(method_registry("one_shot"))
    ['mcq', 'prune']
  """
  if kind is not None:
    core.check_choice("kind", kind, KINDS)
  _load_builtins()
  return {name: spec for name, spec in sorted(_REGISTRY.items())
          if kind is None or spec.kind == kind}
