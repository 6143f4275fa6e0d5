"""The arms file of `memprune benchmark`: one TOML table per arm, checked whole before any model loads.

    [arms."wanda_0.1"]        # the arm's name: its folder under models/ and its column in every table
    method = "wanda"          # a registered method (memprune.methods)
    ratio = 0.1               # that method's settings, named as the command line names them (--ratio)
    timesteps = 10            # ... of every command that builds it (wanda: locate, then prune)
    label = "Wanda, ratio 0.1"          # optional: its row in comparison.md
    control = true            # weight edits: a random control of the same size beside it (default); false: none;
                              # a string: the control's name

    [arms.robust]
    method = "robust-wanda"   # a prune-stage weight edit that starts from located masks ...
    masks_from = "wanda_0.1"  # ... those of this located arm (its DIR/masks/wanda_0.1 is the prune's --masks)
    rounds = 2

    [arms.hardened]
    method = "adversarial"    # a fine-tune ...
    from = "wanda_0.1"        # ... of this arm's edited model (finetune --from DIR/models/wanda_0.1)

Arms are built in file order, so an arm named by masks_from or from must be defined above the arm that names it.
masks_from is for prune-stage weight edits (robust-wanda, which requires it and a Wanda arm as its source, and
uniforget, which unites the source's mask with its own); the source must be a located arm (wanda, nemo: locate then
prune), whose DIR/masks/NAME it reads. A robust-wanda arm does not run a locate of its own: naming the Wanda arm it
grows keeps one locate per mask (minutes each) and puts the source's row beside the grown one in the table. from is
for fine-tunes: the source is any arm that builds a model (a weight edit or another fine-tune). The random control
of a masks_from arm matches its own mask (controls are drawn from the built model, so robust-wanda's grown mask,
not the source's). A dependent arm's fingerprint holds its source's, so a resume refuses a changed source as a
change of every arm built from it, and an arm whose source a resume had to rebuild (its folder gone) is rebuilt too.

The options an arm may set are read from the click declarations of the commands that build its kind (handed in as
`CommandOptions`), so an option a command gains is accepted here without a change. An option whose help starts
with another method's name ("nemo: ...") belongs to that method only. Mitigations (Wen) take the evaluate options
of their own method (wen_lr, ...), since evaluate applies them.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field, replace
from typing import Any

import click

from .. import methods
from ..errors import MemPruneError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

# verb -> {"--long-option": click.Parameter}: the options of the commands an arm is built with
CommandOptions = dict[str, dict[str, click.Parameter]]

# the arm's own keys; every other key is a command option
ARM_KEYS = ("method", "label", "control", "control_label", "masks_from", "from")
# Options the benchmark sets itself for every arm (where its outputs go, which model, on which device).
RESERVED = ("--model", "--method", "--out", "--overwrite", "--device", "--masks", "--masks-out", "--resume",
            "--edited", "--compare", "--mitigation", "--from")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RANDOM_CONTROL_SUFFIX = "_random_control"  # the name evaluate gives the random control of an edited column
# Prune-stage methods that start from located masks (masks_from is required) -> the method that must have located them
STARTS_FROM_MASKS = {"robust-wanda": "wanda"}


@dataclass(frozen=True)
class Arm:
    name: str
    method: str
    kind: str  # the method's kind: weight_edit, mitigation or finetune
    stage: str  # the command that builds it: locate (then prune), prune, finetune or evaluate (a mitigation)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # verb -> {"--option": value}, file order
    label: str = ""
    control: str | None = None  # the name of its random control, None for none
    control_label: str = ""
    masks_from: str | None = None  # the located arm whose DIR/masks/NAME is its prune's --masks
    from_arm: str | None = None  # the arm whose DIR/models/NAME its finetune starts from (--from)
    source_fingerprint: str | None = None  # that arm's fingerprint (parse_arms fills it in)

    @property
    def builds_model(self) -> bool:
        return self.kind != "mitigation"

    @property
    def source(self) -> str | None:
        """The arm this one is built from (masks_from or from), None for none."""
        return self.masks_from or self.from_arm

    def fingerprint(self) -> str:
        """What the arm builds (everything but its label): two arms with the same fingerprint build the same. An arm
        built from another holds that arm's fingerprint, so a changed source is a change of this arm too."""
        record: dict[str, Any] = {"method": self.method, "options": self.options, "control": self.control}
        if self.source is not None:  # absent otherwise: the fingerprints of states written before stay the same
            source = json.loads(self.source_fingerprint) if self.source_fingerprint else None
            record.update({"masks_from": self.masks_from, "from": self.from_arm, "source": source})
        return json.dumps(record, sort_keys=True)

    def argv(self, verb: str) -> list[str]:
        """The arm's options for command `verb` as command-line arguments."""
        return [arg for option, value in self.options.get(verb, {}).items() for arg in _arguments(option, value)]


def _arguments(option: str, value: Any) -> list[str]:
    if isinstance(value, bool):  # a flag: its switch when true (parse_arms stores a false --x/--no-x as --no-x)
        return [option] if value else []
    if isinstance(value, list):
        return [arg for item in value for arg in (option, str(item))]
    return [option, str(value)]


def verbs_of(kind: str, stage: str) -> tuple[str, ...]:
    """The commands that build an arm of this kind (in order) and whose options it may set."""
    if kind == "mitigation":
        return ("evaluate",)
    if kind == "finetune":
        return ("finetune",)
    return ("locate", "prune") if stage == "locate" else ("prune",)


def _owner(parameter: click.Parameter) -> str | None:
    """The method an option belongs to when its help says so ("nemo: first z-score ..."), else None."""
    help_text = getattr(parameter, "help", None) or ""
    prefix = help_text.split(":", 1)[0].strip()
    return prefix if ":" in help_text and prefix in methods.available() else None


def allowed_options(method: str, kind: str, stage: str, commands: CommandOptions) -> dict[str, tuple[str, Any]]:
    """"--option" -> (verb, parameter) of every option an arm of `method` may set."""
    allowed: dict[str, tuple[str, Any]] = {}
    for verb in verbs_of(kind, stage):
        for option, parameter in commands[verb].items():
            owner = _owner(parameter)
            if option in RESERVED or option in allowed or (owner is not None and owner != method):
                continue
            if kind == "mitigation" and owner != method:
                continue  # evaluate's own options are the benchmark's, not an arm's
            allowed[option] = (verb, parameter)
    return allowed


def line_of(text: str, arm: str, key: str | None = None) -> int | None:
    """The line (1-based) of arm's table header, or of `key` inside that table; None when not found."""
    header = re.compile(r'^\s*\[\s*arms\s*\.\s*(?:"' + re.escape(arm) + r'"|\'' + re.escape(arm) + r'\'|'
                        + re.escape(arm) + r')\s*\]')
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if header.match(line):
            if key is None:
                return number
            for inner, body in enumerate(lines[number:], number + 1):
                if body.lstrip().startswith("["):
                    break
                if re.match(r'^\s*["\']?' + re.escape(key) + r'["\']?\s*=', body):
                    return inner
            return number
    return None


def _where(source: str, text: str, arm: str, key: str | None = None) -> str:
    line = line_of(text, arm, key)
    return f"{source}, line {line}" if line else source


def parse_arms(text: str, commands: CommandOptions, source: str = "arms file") -> list[Arm]:
    """Every arm of an arms file, checked: known methods, known options of the right type, unique names."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MemPruneError(f"{source} is not valid TOML: {exc}.") from None
    unknown = [key for key in document if key != "arms"]
    if unknown:
        raise MemPruneError(f"{source}: unknown top-level key '{unknown[0]}': the file holds [arms.NAME] tables only.")
    tables = document.get("arms")
    if not isinstance(tables, dict) or not tables:
        raise MemPruneError(f"{source} defines no arm: add an [arms.NAME] table with method = \"...\".")
    arms = [_parse_arm(name, table, commands, source, text) for name, table in tables.items()]
    _check_names(arms, source, text)
    return _link_sources(arms, source, text)


def _parse_arm(name: str, table: Any, commands: CommandOptions, source: str, text: str) -> Arm:
    where = _where(source, text, name)
    if not isinstance(table, dict):
        raise MemPruneError(f"{where}: arms.{name} must be a table ([arms.{name}]).")
    if not NAME.match(name) or name == "unedited":
        raise MemPruneError(f"{where}: arm name '{name}' must be a folder name of letters, digits, '_', '.' or '-' "
                            "(and not 'unedited').")
    method = table.get("method")
    registry = methods.available()
    if method not in registry:
        raise MemPruneError(f"{_where(source, text, name, 'method')}: arm '{name}' names unknown method "
                            f"{method!r}: use one of {', '.join(sorted(registry))}.")
    info = registry[method].METHOD
    stage = "evaluate" if info.kind == "mitigation" else "finetune" if info.kind == "finetune" else info.stage
    allowed = allowed_options(method, info.kind, info.stage, commands)
    options: dict[str, dict[str, Any]] = {}
    for key, value in table.items():
        if key in ARM_KEYS:
            continue
        option = "--" + key.replace("_", "-")
        if option not in allowed:
            valid = ", ".join(sorted(o[2:].replace("-", "_") for o in allowed))
            raise MemPruneError(f"{_where(source, text, name, key)}: arm '{name}' sets unknown option '{key}' for "
                                f"method {method}: valid options are {valid}.")
        verb, parameter = allowed[option]
        checked = _checked_value(value, parameter, f"{_where(source, text, name, key)}: arm '{name}', {key}")
        if checked is False and getattr(parameter, "secondary_opts", None):
            option, checked = parameter.secondary_opts[0], True  # --x/--no-x = false: pass --no-x
        options.setdefault(verb, {})[option] = checked
    control = _control(table, name, info.kind, _where(source, text, name, "control"))
    label = table.get("label", name)
    control_label = table.get("control_label", f"random control of {label} (same size)")
    for key, value in (("label", label), ("control_label", control_label)):
        if not isinstance(value, str):
            raise MemPruneError(f"{_where(source, text, name, key)}: arm '{name}': {key} must be a string.")
    masks_from, from_arm = (_source_key(table, key, name, method, info.kind, stage, _where(source, text, name, key))
                            for key in ("masks_from", "from"))
    return Arm(name=name, method=method, kind=info.kind, stage=stage, options=options, label=label, control=control,
               control_label=control_label, masks_from=masks_from, from_arm=from_arm)


def _source_key(table: dict, key: str, name: str, method: str, kind: str, stage: str, where: str) -> str | None:
    """masks_from or from as given, refused when the method has no use for it (the arm it names is checked later)."""
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise MemPruneError(f"{where}: arm '{name}', {key}: give the name of another arm as a string, not {value!r}.")
    if key == "masks_from" and (kind != "weight_edit" or stage != "prune"):
        why = "its masks come from its own locate" if stage == "locate" else f"it is a {kind.replace('_', ' ')}"
        raise MemPruneError(f"{where}: arm '{name}' ({method}) takes no masks ({why}): masks_from is for prune-stage "
                            "weight edits that start from located masks (robust-wanda, uniforget).")
    if key == "from" and kind != "finetune":
        raise MemPruneError(f"{where}: arm '{name}' ({method}) is a {kind.replace('_', ' ')}; from is for fine-tunes "
                            "(finetune --from: harden another arm's edited model).")
    return value


def _link_sources(arms: list[Arm], source: str, text: str) -> list[Arm]:
    """Each masks_from / from checked against the arms above it (arms are built in file order) and its source's
    fingerprint put into the dependent arm's; a robust-wanda arm without masks_from refused."""
    by_name: dict[str, Arm] = {}
    controls = {arm.control: arm.name for arm in arms if arm.control}
    names = [arm.name for arm in arms]
    linked = []
    for arm in arms:
        needed = STARTS_FROM_MASKS.get(arm.method)
        if needed and arm.masks_from is None:
            raise MemPruneError(f"{_where(source, text, arm.name)}: arm '{arm.name}' ({arm.method}) starts from "
                                f"located {needed} masks: set masks_from = \"NAME\" to a {needed} arm above it.")
        key = "masks_from" if arm.masks_from else "from"
        where = f"{_where(source, text, arm.name, key)}: arm '{arm.name}', {key} = {arm.source!r}"
        if arm.source is not None:
            target = by_name.get(arm.source)
            if arm.source in controls:
                raise MemPruneError(f"{where} is the random control of arm '{controls[arm.source]}', not an arm: "
                                    "name an arm of the file.")
            if arm.source not in names:
                raise MemPruneError(f"{where} names no arm of the file: arms are {', '.join(names)}.")
            if target is None:
                raise MemPruneError(f"{where} is {'the arm itself' if arm.source == arm.name else 'defined after it'}"
                                    ": arms are built in file order, so define the source above the arm built "
                                    "from it.")
            if key == "masks_from" and target.stage != "locate":
                raise MemPruneError(f"{where} is not a located arm ({target.method} writes no locate masks): name "
                                    "an arm whose method locates (wanda, nemo).")
            if key == "masks_from" and needed and target.method != needed:
                raise MemPruneError(f"{where} is a {target.method} arm: {arm.method} starts from {needed} masks.")
            if key == "from" and not target.builds_model:
                raise MemPruneError(f"{where} is a mitigation and builds no model to start from.")
            arm = replace(arm, source_fingerprint=target.fingerprint())
        by_name[arm.name] = arm
        linked.append(arm)
    return linked


def _checked_value(value: Any, parameter: Any, where: str) -> Any:
    """The TOML value, refused with its place when the option's click type does not accept it."""
    if getattr(parameter, "is_flag", False):
        if not isinstance(value, bool):
            raise MemPruneError(f"{where} is a flag: give true or false, not {value!r}.")
        return value
    multiple = getattr(parameter, "multiple", False)
    if multiple and not isinstance(value, list):
        value = [value]
    for item in value if multiple else [value]:
        takes_bool = isinstance(parameter.type, click.types.BoolParamType)
        if isinstance(item, (dict, list)) or (isinstance(item, bool) and not takes_bool):
            raise MemPruneError(f"{where}: {item!r} is not a {parameter.type.name} value.")
        try:
            parameter.type.convert(item if isinstance(item, str) else str(item), parameter, None)
        except click.BadParameter as exc:
            raise MemPruneError(f"{where}: {exc.message}") from None
    return value


def _control(table: dict, name: str, kind: str, where: str) -> str | None:
    control = table.get("control", kind == "weight_edit")
    if control is False:
        return None
    if kind != "weight_edit":
        raise MemPruneError(f"{where}: arm '{name}' is a {kind.replace('_', ' ')}; random controls are for weight "
                            "edits (give a fine-tune's control as its own arm, e.g. method = \"plain\").")
    if control is True:
        return name + RANDOM_CONTROL_SUFFIX
    if not isinstance(control, str) or not NAME.match(control):
        raise MemPruneError(f"{where}: arm '{name}': control must be true, false or a folder name.")
    return control


def _check_names(arms: list[Arm], source: str, text: str) -> None:
    seen: dict[str, str] = {}
    mitigations = [arm for arm in arms if arm.kind == "mitigation"]
    if len(mitigations) > 1:
        raise MemPruneError(f"{_where(source, text, mitigations[1].name)}: arm '{mitigations[1].name}' is a second "
                            "mitigation; one evaluate applies one mitigation, so a benchmark holds at most one.")
    for arm in arms:
        for column in (arm.name, arm.control):
            if column is None:
                continue
            if column in seen or column == "unedited":
                raise MemPruneError(f"{_where(source, text, arm.name)}: the name '{column}' of arm '{arm.name}' is "
                                    f"taken (by arm '{seen.get(column, 'unedited')}'): every model needs its own name.")
            seen[column] = arm.name


def columns(arms: list[Arm]) -> list[str]:
    """The model columns of the benchmark in table order: each arm, its random control right after it."""
    return [column for arm in arms for column in (arm.name, arm.control) if column is not None]


def labels(arms: list[Arm]) -> dict[str, str]:
    named = {"unedited": "unedited"}
    for arm in arms:
        named[arm.name] = arm.label
        if arm.control:
            named[arm.control] = arm.control_label
    return named
