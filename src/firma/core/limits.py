"""Resource limits of a run (DESIGN §5.3). Pure: what the user asked for (the command line and
the trusted `[run].limits`) with the defaults, and which mechanism of this host enforces each.

Mechanisms, best first: a cgroup made for the run under the launcher's own (v2 where the
launcher's group is delegated to it, v1 controllers as root), then rlimits, which are always set
as the floor: RLIMIT_NPROC in the sandbox's user namespace (it counts that namespace's processes),
RLIMIT_NOFILE, RLIMIT_FSIZE, and RLIMIT_DATA for memory only where no memory cgroup exists,
labelled as what it is: a cap on each process, not on the sandbox. RLIMIT_AS is never used (it
breaks Node's WebAssembly and the JVM at ordinary sizes).

A default that no mechanism of this host can carry is labelled best-effort in the proof; a
limit the user asked for explicitly refuses the launch instead, unless `--limits best-effort`."""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import ConfigError, LaunchError
from .record import field, record, replace

MEMORY = "memory"
PIDS = "pids"
CPUS = "cpus"
NOFILE = "nofile"
FILE_SIZE = "file_size"
MODE = "mode"
LIMIT_KEYS = (MEMORY, PIDS, CPUS, NOFILE, FILE_SIZE, MODE)  # `[run].limits` keys

STRICT = "strict"
BEST_EFFORT = "best-effort"
OFF = "off"  # no limit at all (a weakening, in the proof); tmpfs mounts keep their sizes
MODES = (STRICT, BEST_EFFORT, OFF)
CEILING = "limits_ceiling"  # merged settings key: an untrusted project config's limits (lower only)

# Defaults: a fork bomb or a memory runaway stops long before the host suffers, while a build,
# a test suite or a language server stays far below (DESIGN §5.3 says why these values).
DEFAULT_PIDS = 4096
MIN_PIDS = 16
DEFAULT_MEMORY_DIVISOR = 2  # half of RAM
MIN_MEMORY = 64 << 20
DEFAULT_NOFILE = 65536
MIN_NOFILE = 64
DEFAULT_FILE_SIZE = 16 << 30
MIN_FILE_SIZE = 1 << 20
# With a pids cgroup, RLIMIT_NPROC sits this far above pids.max: the cgroup, which counts its
# refusals (for the run summary), is the one that answers; the rlimit stays as the floor.
NPROC_MARGIN = 64
CPU_PERIOD_US = 100_000

V1 = "v1"
V2 = "v2"

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def fmt_bytes(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    if n >= 1 << 20:
        return f"{n >> 20} MiB"
    return f"{n} bytes"


def parse_size(raw: Any, what: str, mem_total: int | None) -> int:
    """A size: bytes as an integer, or text like `512m`, `2g`, `2GiB`, `1.5G`, or a share of RAM
    (`25%`, memory only)."""
    if isinstance(raw, bool):
        raise ConfigError(f"{what} must be a size such as 512m or 4g")
    if isinstance(raw, int):
        return raw
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError(f"{what} must be a size such as 512m or 4g")
    text = raw.strip().lower()
    if text.endswith("%"):
        if what != "--memory" and not what.endswith("memory"):
            raise ConfigError(f"{what}: a share of RAM is accepted for memory only")
        if mem_total is None:
            raise ConfigError(f"{what} {raw}: this host's RAM is unknown; give a size such as 4g")
        try:
            share = float(text[:-1])
        except ValueError:
            raise ConfigError(f"{what} {raw}: not a percentage") from None
        if not 0 < share <= 100:
            raise ConfigError(f"{what} {raw}: a share of RAM is between 0 and 100%")
        return int(mem_total * share / 100)
    for suffix in ("ib", "b"):
        if text.endswith(suffix) and len(text) > len(suffix) and text[-len(suffix) - 1] in "kmgt":
            text = text[: -len(suffix)]
            break
    unit = text[-1] if text[-1] in "kmgtb" else ""
    number = text[:-1] if unit else text
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"{what} {raw}: not a size; use a number with k, m, g or t (512m, 4g)") from None
    if value != value or value < 0:
        raise ConfigError(f"{what} {raw}: not a size")
    return int(value * _UNITS[unit])


def parse_cpus(raw: Any, what: str) -> float:
    if isinstance(raw, bool):
        raise ConfigError(f"{what} must be a number of CPUs such as 2 or 0.5")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {raw}: not a number of CPUs (2, 0.5)") from None
    if not 0.01 <= value <= 4096:
        raise ConfigError(f"{what} {raw}: give between 0.01 and 4096 CPUs")
    return value


def _int(raw: Any, what: str, minimum: int, why: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        try:
            raw = int(str(raw), 10)
        except ValueError:
            raise ConfigError(f"{what} {raw}: not a whole number") from None
    if raw < minimum:
        raise ConfigError(f"{what} {raw} is too low {why}; give at least {minimum}")
    return raw


@record
class LimitRequest:
    """The limits of one run: defaults where the user said nothing."""

    memory: int | None = None  # bytes for the sandbox; None: RAM unknown and none asked for
    pids: int = DEFAULT_PIDS
    cpus: float | None = None  # None: not limited
    nofile: int = DEFAULT_NOFILE
    file_size: int = DEFAULT_FILE_SIZE
    explicit: frozenset[str] = frozenset()  # names the user set (command line or config)
    mode: str = STRICT


def check_table(table: Any, where: str) -> dict[str, Any]:
    """`[run].limits` from a config file: known keys with values of the right kind (sizes and
    shares are checked again when the plan is built, against this host's RAM)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table (memory, pids, cpus, nofile, file_size, mode)")
    for key, value in table.items():
        if key not in LIMIT_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}'; known: {', '.join(LIMIT_KEYS)}")
        if key == MODE and value not in MODES:
            raise ConfigError(f"{where}.mode must be \"strict\", \"best-effort\" or \"off\"")
        if key in (PIDS, NOFILE) and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{where}.{key} must be a whole number")
        if key in (MEMORY, FILE_SIZE) and (isinstance(value, bool) or not isinstance(value, (int, str))):
            raise ConfigError(f"{where}.{key} must be a size such as \"4g\" or a number of bytes")
        if key == CPUS and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where}.cpus must be a number such as 2 or 0.5")
    return dict(table)


def request(config: Mapping[str, Any], cli: Mapping[str, Any], mem_total: int | None,
            ceiling: Mapping[str, Any] | None = None) -> LimitRequest:
    """The run's limits: `cli` (`--memory`, `--pids`, `--cpus`, `--limits`; None when absent) over
    the trusted `[run].limits` table `config`, over the defaults. `ceiling`: an untrusted project
    config's `[run].limits`, honoured only where it is lower (DESIGN §15)."""
    req = _request(config, cli, mem_total)
    if not ceiling or req.mode == OFF:
        return req
    lowered = dict(ceiling)
    lowered.pop(MODE, None)
    low = _request(lowered, {}, mem_total)
    changes: dict[str, Any] = {}
    for key in lowered:
        mine, theirs = getattr(req, key), getattr(low, key)
        if theirs is not None and (mine is None or theirs < mine):
            changes[key] = theirs
    if not changes:
        return req
    return replace(req, explicit=req.explicit | frozenset(changes), **changes)


def _request(config: Mapping[str, Any], cli: Mapping[str, Any], mem_total: int | None) -> LimitRequest:
    values: dict[str, tuple[Any, str]] = {k: (v, f"[run].limits.{k}") for k, v in config.items()}
    for k, v in cli.items():
        if v is not None:
            values[k] = (v, "--limits" if k == MODE else f"--{k.replace('_', '-')}")
    explicit = frozenset(k for k in values if k != MODE)
    mode = values.get(MODE, (STRICT, ""))[0]
    if mode not in MODES:
        raise ConfigError(f"--limits {mode}: use strict, best-effort or off")
    if mode == OFF and explicit:
        names = ", ".join(sorted(values[k][1] for k in explicit))
        raise ConfigError(f"--limits off conflicts with {names}; drop one of them")
    memory = mem_total // DEFAULT_MEMORY_DIVISOR if mem_total and mode != OFF else None
    if MEMORY in values:
        raw, what = values[MEMORY]
        memory = parse_size(raw, what, mem_total)
        if memory < MIN_MEMORY:
            raise ConfigError(f"{what} {raw} is too low for a shell and its tools; give at least 64m")
    pids = DEFAULT_PIDS
    if PIDS in values:
        raw, what = values[PIDS]
        pids = _int(raw, what, MIN_PIDS, "for a shell and its tools")
    cpus = parse_cpus(*values[CPUS]) if CPUS in values else None
    nofile = DEFAULT_NOFILE
    if NOFILE in values:
        raw, what = values[NOFILE]
        nofile = _int(raw, what, MIN_NOFILE, "for a shell and its tools")
    file_size = DEFAULT_FILE_SIZE
    if FILE_SIZE in values:
        raw, what = values[FILE_SIZE]
        file_size = parse_size(raw, what, mem_total)
        if file_size < MIN_FILE_SIZE:
            raise ConfigError(f"{what} {raw} is too low; give at least 1m")
    return LimitRequest(memory=memory, pids=pids, cpus=cpus, nofile=nofile, file_size=file_size,
                        explicit=explicit, mode=mode)


@record
class CgroupFacts:
    """What this host lets the launcher do with cgroups (measured by firma.host)."""

    version: str | None = None  # V2, V1 or None: no usable controller
    parents: Mapping[str, str] = field(default_factory=dict)  # controller -> where the run's group is made
    # v2: the launcher's group holds only the launcher, which first moves itself into a leaf of
    # it (a group with processes cannot hand controllers to its children).
    move_self: bool = False
    why_not: str = ""  # why a cgroup controller is missing, for doctor and refusals

    def has(self, controller: str) -> bool:
        return controller in self.parents


@record
class CgroupWrite:
    controller: str
    file: str
    value: str
    optional: bool = False  # written where the file exists (swap accounting can be off)


@record
class LimitEntry:
    """One limit in the proof: its value, what enforces it, over what scope."""

    name: str
    value: str
    mechanism: str
    scope: str  # "the sandbox", "each process", "each file", "each writable tmpfs"
    enforced: bool  # the mechanism is in force (read back at launch)
    best_effort: bool = False  # weaker than a sandbox-wide limit, or not enforced at all
    explicit: bool = False
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "mechanism": self.mechanism, "scope": self.scope,
                "enforced": self.enforced, "best_effort": self.best_effort, "explicit": self.explicit,
                "note": self.note}


@record
class LimitPlan:
    mode: str = STRICT
    entries: tuple[LimitEntry, ...] = ()
    cgroup_version: str | None = None
    cgroup_parents: Mapping[str, str] = field(default_factory=dict)  # the controllers used
    move_self: bool = False
    writes: tuple[CgroupWrite, ...] = ()
    rlimits: tuple[tuple[str, int], ...] = ()  # ("NPROC" | "NOFILE" | "FSIZE" | "DATA", value)
    memory: int | None = None
    pids: int | None = None
    file_size: int | None = None
    enforced_by_firma: bool = True

    def as_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "enforced_by_firma": self.enforced_by_firma,
            "cgroup": self.cgroup_version,
            "entries": [e.as_json() for e in self.entries],
        }

    def with_entry(self, entry: LimitEntry) -> LimitPlan:
        return replace(self, entries=self.entries + (entry,))


def _refuse(flag: str, why: str, instead: str) -> LaunchError:
    return LaunchError(f"{flag} cannot be enforced on this host: {why}; {instead}, or pass --limits best-effort")


def plan_limits(req: LimitRequest, facts: CgroupFacts, caller: Mapping[str, int | None] | None = None) -> LimitPlan:
    """Each limit with the best mechanism `facts` offer. An explicit limit that only a weaker
    mechanism (or none) could carry raises LaunchError unless the mode is best-effort. `caller`:
    the caller's hard rlimits by name (None: unlimited); the sandbox never gets more."""
    caller = caller or {}
    if req.mode == OFF:
        return LimitPlan(mode=OFF, entries=tuple(
            LimitEntry(n, "none", "none", "the sandbox", False, best_effort=True, note="--limits off")
            for n in (MEMORY, PIDS, CPUS, NOFILE, FILE_SIZE)))

    def lowered(name: str, value: int) -> tuple[int, str]:
        hard = caller.get(name)
        if hard is not None and hard < value:
            return hard, f"the caller's hard limit ({hard}) is lower"
        return value, ""

    v = facts.version
    entries: list[LimitEntry] = []
    writes: list[CgroupWrite] = []
    rlimits: list[tuple[str, int]] = []
    used: dict[str, str] = {}
    lenient = req.mode == BEST_EFFORT
    why = facts.why_not or "no cgroup controller firma may use"

    def cg(controller: str) -> bool:
        if facts.has(controller):
            used[controller] = facts.parents[controller]
            return True
        return False

    # memory
    if req.memory is not None:
        explicit = MEMORY in req.explicit
        if cg(MEMORY):
            if v == V2:
                writes += [CgroupWrite(MEMORY, "memory.max", str(req.memory)),
                           CgroupWrite(MEMORY, "memory.swap.max", "0", optional=True)]
                mech = "cgroup v2 memory.max (swap 0)"
            else:
                writes += [CgroupWrite(MEMORY, "memory.limit_in_bytes", str(req.memory)),
                           CgroupWrite(MEMORY, "memory.memsw.limit_in_bytes", str(req.memory), optional=True)]
                mech = "cgroup v1 memory.limit_in_bytes (and memsw where swap is accounted)"
            entries.append(LimitEntry(MEMORY, fmt_bytes(req.memory), mech, "the sandbox (its tmpfs included)",
                                      True, explicit=explicit))
        else:
            if explicit and not lenient:
                raise _refuse("--memory", f"no memory cgroup ({why})",
                              "run firma where it may create a cgroup (as root, or in a delegated systemd scope)")
            rlimits.append(("DATA", lowered("DATA", req.memory)[0]))
            entries.append(LimitEntry(MEMORY, fmt_bytes(req.memory), "RLIMIT_DATA", "each process", True,
                                      best_effort=True, explicit=explicit,
                                      note=f"no memory cgroup ({why}): each process is capped, not the sandbox"))
    else:
        entries.append(LimitEntry(MEMORY, "none", "none", "the sandbox", False, best_effort=True,
                                  note="this host's RAM is unknown and no --memory was given"))
    # pids: RLIMIT_NPROC in the sandbox's user namespace is sandbox-wide by itself
    explicit = PIDS in req.explicit
    if cg(PIDS):
        writes.append(CgroupWrite(PIDS, "pids.max", str(req.pids)))
        rlimits.append(("NPROC", lowered("NPROC", req.pids + NPROC_MARGIN)[0]))
        entries.append(LimitEntry(PIDS, str(req.pids), f"cgroup {v} pids.max (RLIMIT_NPROC {req.pids + NPROC_MARGIN} as the floor)",
                                  "the sandbox", True, explicit=explicit))
    else:
        pids, note = lowered("NPROC", req.pids)
        rlimits.append(("NPROC", pids))
        entries.append(LimitEntry(PIDS, str(pids), "RLIMIT_NPROC in the sandbox's user namespace", "the sandbox",
                                  True, explicit=explicit, note=note))
    # cpus
    if req.cpus is not None:
        explicit = CPUS in req.explicit
        quota = max(1000, round(req.cpus * CPU_PERIOD_US))
        if cg("cpu"):
            if v == V2:
                writes.append(CgroupWrite("cpu", "cpu.max", f"{quota} {CPU_PERIOD_US}"))
                mech = "cgroup v2 cpu.max"
            else:
                writes += [CgroupWrite("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US)),
                           CgroupWrite("cpu", "cpu.cfs_quota_us", str(quota))]
                mech = "cgroup v1 cpu.cfs_quota_us"
            entries.append(LimitEntry(CPUS, f"{req.cpus:g}", mech, "the sandbox", True, explicit=explicit))
        else:
            if not lenient:
                raise _refuse("--cpus", f"no cpu cgroup ({why})",
                              "run firma where it may create a cgroup (as root, or in a delegated systemd scope)")
            entries.append(LimitEntry(CPUS, f"{req.cpus:g}", "none", "the sandbox", False, best_effort=True,
                                      explicit=explicit, note=f"no cpu cgroup ({why})"))
    else:
        entries.append(LimitEntry(CPUS, "none", "none", "the sandbox", False,
                                  note="not limited by default: CPU use slows the host, it does not exhaust it"))
    nofile, note = lowered("NOFILE", req.nofile)
    rlimits.append(("NOFILE", nofile))
    entries.append(LimitEntry(NOFILE, str(nofile), "RLIMIT_NOFILE", "each process", True,
                              explicit=NOFILE in req.explicit, note=note))
    file_size, note = lowered("FSIZE", req.file_size)
    rlimits.append(("FSIZE", file_size))
    entries.append(LimitEntry(FILE_SIZE, fmt_bytes(file_size), "RLIMIT_FSIZE", "each file",
                              True, explicit=FILE_SIZE in req.explicit, note=note))
    return LimitPlan(mode=req.mode, entries=tuple(entries), cgroup_version=v if used else None,
                     cgroup_parents=used, move_self=facts.move_self and bool(used), writes=tuple(writes),
                     rlimits=tuple(rlimits), memory=req.memory if facts.has(MEMORY) else None, pids=req.pids,
                     file_size=file_size)


def tmpfs_entry(size: int, counted: bool) -> LimitEntry:
    return LimitEntry("tmpfs", fmt_bytes(size), "tmpfs size", "each writable tmpfs", True,
                      note="counted against the memory limit" if counted else "host RAM, not counted against a memory cgroup")


def not_enforced(req: LimitRequest, backend: str) -> LimitPlan:
    """The runner and vz backends: launch contract v1 carries no limits. An explicit one refuses
    the launch unless best-effort; the proof says none is enforced by firma."""
    if req.explicit and req.mode != BEST_EFFORT:
        names = ", ".join("--" + n.replace("_", "-") for n in sorted(req.explicit))
        raise LaunchError(f"{names} cannot be enforced by the {backend} backend (launch contract v1 carries no "
                          "limits); remove them, use the bwrap backend, or pass --limits best-effort")
    note = f"the {backend} backend: launch contract v1 carries no limits"
    entries = tuple(LimitEntry(n, "none", "none", "the sandbox", False, best_effort=True, explicit=n in req.explicit,
                               note=note) for n in (MEMORY, PIDS, CPUS, NOFILE, FILE_SIZE))
    return LimitPlan(mode=req.mode, entries=entries, enforced_by_firma=False)


def limit_notes(plan: LimitPlan, events: Mapping[str, int], exit_status: int | None) -> tuple[str, ...]:
    """One line per limit the run hit, for the run summary: `events` holds the run's cgroup
    counters (oom_kill, pids_max); a process ended by SIGXFSZ hit the file size limit."""
    notes: list[str] = []
    if events.get("oom_kill", 0) and plan.memory is not None:
        notes.append(f"memory limit reached ({fmt_bytes(plan.memory)}): the kernel ended "
                     f"{events['oom_kill']} process(es) of the run out of memory (--memory)")
    if events.get("pids_max", 0) and plan.pids is not None:
        notes.append(f"process limit reached ({plan.pids}): {events['pids_max']} fork(s) refused (--pids)")
    if exit_status == 128 + 25 and plan.file_size is not None:  # SIGXFSZ
        notes.append(f"the agent was ended by SIGXFSZ: a file reached the size limit ({fmt_bytes(plan.file_size)}, "
                     "[run].limits.file_size)")
    return tuple(notes)
