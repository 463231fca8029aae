"""
Averaging during training: the averagers of averaging.py over the model's flat parameters,
sharded across DDP ranks, with their config keys, evaluation swap and checkpoint state.

    online = OnlineAveraging(flat, averager_hparams(cfg), rank, world_size)
    online.update(step)                      # after every optimizer step (s = updates applied)
    with online.swapped_in("bema"):          # the model now holds the BEMA weights
        evaluate(model)
    ckpt["averaging"] = online.state_dict()  # full (gathered) state, independent of world size

Step convention: s counts optimizer updates applied, so θ_0 is the initial model and θ_s the
weights saved in ckpt_<s>.pt and snapshots/step_<s>.safetensors. An averager with burn-in τ = 0
initialises from θ_0.

DDP: every rank holds the same θ after a step, so each rank averages only its contiguous slice
of the flat buffer (slice r of ceil(n / world) entries): averager memory and update time per rank
are 1/world of the whole. The slices are gathered only to evaluate or save an average. The
update is elementwise, so the gathered result equals the single-process one.
"""

import dataclasses
from contextlib import contextmanager

import torch
import torch.distributed as dist

from averaging import AVERAGERS, SIGMA_REL_MAX, build_averager, parse_method_list
from wagpt.configurator import FieldGroup, dict_notes
from wagpt.errors import ConfigError, Problems


def key_type(cls, key):
    """The config type of averager key `key`: that of its default, or `T | None` for a key the
    class lists in `optional_keys` as taking None besides values of type T (phema's two width
    keys: exactly one is set)."""
    optional = cls.optional_keys
    return optional[key] | None if key in optional else type(cls.defaults[key])


def averager_fields(make_field):
    """One dataclass field per hyperparameter of every registered method, in registry order:
    [(key, annotation, field)]. make_field(cls, key, default) gives (annotation, default value);
    the field's metadata carries the method's group and the comment of the key in the class's
    `defaults` (for --help)."""
    fields = []
    for cls in AVERAGERS.values():
        summary = (cls.__doc__ or "").strip().split("\n\n")[0]   # the docstring's first paragraph
        group = FieldGroup(f"averaging: {cls.name}", summary, generated=True)
        comments = dict_notes(cls, "defaults")
        for key, default in cls.defaults.items():
            annotation, value = make_field(cls, key, default)
            fields.append((key, annotation, dataclasses.field(
                default=value, metadata={"group": group, "help": comments.get(key, "")})))
    return fields


def make_averaging_config():
    """The dataclass of every averager key with its class default; TrainConfig inherits it, so
    `--bema_lag=5` works and an unknown key is an error. Built from the registry at import."""
    return dataclasses.make_dataclass(
        "AveragingConfig",
        averager_fields(lambda cls, key, default: (key_type(cls, key), default)))


AveragingConfig = make_averaging_config()


def parse_methods(spec):
    return parse_method_list(spec, key="averaging", allow_empty=True)


def posthoc_profiles(cfg):
    """{profile name: phema hyperparameters} of the post-hoc EMA profiles train.py keeps
    (posthoc_sigma_rel, posthoc_update_after, posthoc_update_freq), validated; {} when they are
    off: no widths, or no snapshots to write them with (snapshot_interval 0)."""
    widths = list(cfg.posthoc_sigma_rel or ())
    profiles = {}
    for sigma_rel in widths:
        if not 0 < sigma_rel <= SIGMA_REL_MAX:
            raise ValueError(f"posthoc_sigma_rel={tuple(widths)}: {sigma_rel} is not a width of "
                             f"a power-function EMA; each must be in (0, 1/sqrt(12) = "
                             f"{SIGMA_REL_MAX:.6f}] (EDM2 stores 0.05 and 0.1)")
        name = profile_name(sigma_rel)
        if name in profiles:
            raise ValueError(f"posthoc_sigma_rel={tuple(widths)} lists {sigma_rel} twice")
        profiles[name] = {"phema_sigma_rel": float(sigma_rel), "phema_gamma": None,
                          "phema_update_after": cfg.posthoc_update_after,
                          "phema_update_freq": cfg.posthoc_update_freq}
        try:
            build_averager("phema", **profiles[name])
        except ValueError as e:   # name the train.py keys, not the averager's
            raise ValueError(str(e).replace("phema_update", "posthoc_update")) from None
    return profiles if cfg.snapshot_interval else {}


def profile_name(sigma_rel):
    """The name of a stored profile in posthoc files and resume checkpoints: 'sigma_rel=0.05'."""
    return f"sigma_rel={float(sigma_rel)!r}"


def averager_hparams(cfg):
    """{method: its hyperparameters from cfg} for the methods in cfg.averaging; validates them
    (an impossible value raises here, naming the key, before any work is done)."""
    methods = {name: {key: getattr(cfg, key) for key in AVERAGERS[name].defaults}
               for name in parse_methods(cfg.averaging)}
    problems = Problems()   # each method's problem, all reported together
    for name, hparams in methods.items():
        with problems.check():
            build_averager(name, **hparams)
    problems.raise_if_any()
    return methods


class OnlineAveraging:
    def __init__(self, flat, methods, rank=0, world_size=1, method=None):
        """methods: {name: hyperparameters}, each averager the registered method `name`; or,
        with `method` given, each one that method under a name of its own (train.py's post-hoc
        profiles: {'sigma_rel=0.05': {...}, 'sigma_rel=0.1': {...}} of method 'phema')."""
        self.flat, self.rank, self.world_size = flat, rank, world_size
        self.numel = flat.buffer.numel()
        self.shard = -(-self.numel // world_size)
        self.lo = min(rank * self.shard, self.numel)
        self.hi = min(self.lo + self.shard, self.numel)
        self.averagers = {name: build_averager(method or name, **hp)
                          for name, hp in methods.items()}

    @property
    def names(self):
        return list(self.averagers)

    def _theta(self):
        return self.flat.buffer[self.lo:self.hi]   # a view: no copy

    def start(self, step):
        """Initialise, at the run's first step, every averager without loaded state whose
        burn-in is this step; refuse those whose burn-in has already passed, all at once."""
        problems = Problems()
        for name, averager in self.averagers.items():
            if averager.step is None and averager.tau < step:
                problems.add(
                    f"{name}: {averager.start_key}={averager.tau}, but this run starts at step "
                    f"{step} with no saved {name} state to continue from; set "
                    f"--{averager.start_key}={step} (or later) to start averaging here, or "
                    f"drop {name} from --averaging")
        problems.raise_if_any()
        for averager in self.averagers.values():
            if averager.step is None:
                averager.update(step, self._theta())

    def update(self, step):
        """Call after the optimizer step that made `step` updates in total."""
        theta = self._theta()
        for averager in self.averagers.values():
            averager.update(step, theta)

    def ready(self):
        """Methods with an average to evaluate (initialised); the same on every rank."""
        return [name for name, a in self.averagers.items() if a.step is not None]

    def gather(self, name):
        """The full averaged flat vector of `name` on this device (a collective under DDP)."""
        local = self.averagers[name].average()
        if local is None:
            return None
        return self._gather_last_dim(local)

    @contextmanager
    def swapped_in(self, name):
        """The model holds the `name` average inside the block; live weights restored after."""
        self.flat.check()
        averaged = self.gather(name)
        if averaged is None:
            raise RuntimeError(f"{name} has not started averaging yet (burn-in "
                               f"{self.averagers[name].start_key}={self.averagers[name].tau})")
        with self.flat.swapped(averaged):
            del averaged   # the swap copied it: free the memory during evaluation
            yield

    def state_tensors(self):
        """This rank's float32 state tensors of every averager (to check they are finite)."""
        return [getattr(a, b) for a in self.averagers.values() for b in a.buffers
                if getattr(a, b) is not None]

    def memory_bytes(self):
        """Averager state on this rank."""
        return sum(a.memory_bytes() for a in self.averagers.values())

    # ---------------------------------------------------------------------------- state

    def state_dict(self):
        """Every averager's state with its slices gathered to full size (a collective under
        DDP): a checkpoint resumes under any world size."""
        out = {}
        for name, averager in self.averagers.items():
            sd = averager.state_dict()
            sd["tensors"] = {k: self._gather_last_dim(v).cpu() for k, v in sd["tensors"].items()}
            if sd["numel"] >= 0:
                sd["numel"] = self.numel
            out[name] = sd
        return out

    def load_state_dict(self, saved, source, strict=True):
        """Load this rank's slice of each configured averager's saved state. A method in the
        config but not in `saved` starts fresh (see start()); one saved but no longer configured
        is dropped. strict=False skips, instead of rejecting, a saved state whose
        hyperparameters differ (a branched run that averages differently). Returns the names
        loaded."""
        loaded = []
        for name, averager in self.averagers.items():
            if name not in saved:
                continue
            sd = dict(saved[name])
            if sd["numel"] >= 0 and sd["numel"] != self.numel:
                raise ConfigError(f"{source}: the saved {name} state covers {sd['numel']} "
                                  f"parameters, this model {self.numel}")
            if not strict and sd["hparams"] != averager.hparams:
                continue
            sd["tensors"] = {k: v[..., self.lo:self.hi].to(self.flat.buffer.device)
                             for k, v in sd["tensors"].items()}
            if sd["numel"] >= 0:
                sd["numel"] = self.hi - self.lo
            try:
                averager.load_state_dict(sd)
            except ValueError as e:
                raise ConfigError(f"{source}: cannot continue its {name} average: {e}") from None
            loaded.append(name)
        return loaded

    # ---------------------------------------------------------------------------- DDP

    def _gather_last_dim(self, local):
        if self.world_size == 1:
            return local
        # equal-sized pieces for all_gather (gloo and NCCL): pad this rank's slice to `shard`
        padded = local.new_zeros(*local.shape[:-1], self.shard)
        padded[..., :local.shape[-1]] = local
        pieces = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(pieces, padded.contiguous())
        return torch.cat(pieces, dim=-1)[..., :self.numel]
