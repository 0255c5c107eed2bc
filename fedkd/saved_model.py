"""The trained model, kept: what each client evaluated at the end of a run, saved without pickle.

`save_model` writes `<run_dir>/model/`:
- `global.safetensors`: the server's final model, for methods that have one (`global_model`);
- `client-<pid>.safetensors`: for methods whose clients evaluate a model of their own, the whole
  `state_dict` of that client's `inference_model` (the module its `evaluate` scores, frozen and
  auxiliary parts included, e.g. PSE's global copy and attention), for each client that holds
  state (it trained);
- `server.safetensors`: for those methods, the server's final arrays: a client without state
  evaluates the model its `inference_model` builds from them and the seeded initialization,
  and is rebuilt the same way (its index entry has `"file": null`), so a population of 100,000
  clients of which a few hundred trained writes a few hundred files, not 100,000;
- `index.json`: method, architectures, files, the modules' non-tensor state and how to rebuild.

`load_model` rebuilds the method's client algorithm from the run's `config.yaml`, asks it for the
same module with the seeded initialization, and loads the weights from the safetensors files only
(safetensors holds raw tensors; nothing in the folder is ever unpickled). So the module it returns
is, tensor for tensor, the one the client evaluated in the run's last round.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fedkd import registry
from fedkd.clients.base import Arrays, ClientAlgorithm
from fedkd.config import FedkdConfig, from_yaml
from fedkd.state import ClientStateStore

FORMAT = "fedkd-model/1"
MODEL_DIR = "model"
INDEX = "index.json"
GLOBAL_FILE = "global.safetensors"
SERVER_FILE = "server.safetensors"
CPU = torch.device("cpu")


def client_file(partition_id: int) -> str:
    return f"client-{partition_id}.safetensors"


def build_algorithm(cfg: FedkdConfig, input_shape: tuple[int, ...], num_classes: int
                    ) -> ClientAlgorithm:
    """The method's client algorithm on the CPU, seeded as in the run."""
    spec = registry.METHODS[cfg.method["name"]]
    return spec.client(cfg, registry.method_settings(cfg), tuple(input_shape), num_classes, CPU)


def _split_state(module: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A module's state_dict as (tensors safetensors can store: CPU, contiguous, no shared memory;
    the non-tensor entries, e.g. `get_extra_state`, which go into the JSON index)."""
    tensors: dict[str, Tensor] = {}
    extra: dict[str, Any] = {}
    for key, value in module.state_dict().items():
        if isinstance(value, Tensor):
            tensors[key] = value.detach().to(CPU).contiguous().clone()
        else:
            try:
                json.dumps(value)
            except TypeError:
                raise TypeError(f"{type(module).__name__} state {key!r} is neither a tensor nor "
                                f"JSON ({type(value).__name__}); it cannot be saved") from None
            extra[key] = value
    return tensors, extra


def _entry(file: str, module: nn.Module, tensors: dict[str, Tensor], extra: dict[str, Any],
           **more: Any) -> dict[str, Any]:
    return {"file": file, "module": f"{type(module).__module__}.{type(module).__qualname__}",
            **more, "parameters": sum(t.numel() for t in tensors.values()), "extra_state": extra}


def save_model(run_dir: str | Path, cfg: FedkdConfig, global_arrays: Arrays | ArrayRecord) -> Path:
    """Write the final model of every client (and the global one) under `run_dir/model/`.

    `global_arrays` is what the server holds after the last round (Flower's `Result.arrays`,
    as an ArrayRecord or named tensors); client state is read from `run_dir/state`. The folder
    is written beside and then moved into place, so it is never half-written. Returns it.
    """
    from fedkd.data import load_federated  # cached per process: the run already loaded it

    run_dir = Path(run_dir)
    if isinstance(global_arrays, ArrayRecord):
        global_arrays = global_arrays.to_torch_state_dict() if len(global_arrays) else {}
    arrays = {k: torch.as_tensor(v).to(CPU) for k, v in global_arrays.items()}
    data = load_federated(cfg.data, cfg.experiment.seed)
    algorithm = build_algorithm(cfg, data.input_shape, data.num_classes)
    kind = type(algorithm)
    final_round = cfg.train.rounds
    tmp = run_dir / f".{MODEL_DIR}-tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"format": FORMAT, "method": cfg.method["name"]}

    global_entry = None
    global_module = algorithm.global_model(arrays)
    if global_module is not None:
        tensors, extra = _split_state(global_module)  # copies: hooks below reuse the modules
        save_file(tensors, str(tmp / GLOBAL_FILE), metadata=meta)
        global_entry = _entry(GLOBAL_FILE, global_module, tensors, extra)
    clients: dict[str, Any] = {}
    store = ClientStateStore(run_dir / "state")
    own_models = not (kind.evaluates == "global" and global_entry is not None)
    if own_models and arrays:
        save_file({k: v.contiguous().clone() for k, v in arrays.items()}, str(tmp / SERVER_FILE),
                  metadata=meta)
    for pid in range(len(data.clients)):
        model_name = algorithm.model_name(pid) if kind.uses_model_config else None
        if not own_models:
            clients[str(pid)] = {"file": GLOBAL_FILE, "model_name": model_name}
            continue
        state = store.load(pid)
        if not state:  # rebuilt from server.safetensors by load_model, as its evaluate built it
            clients[str(pid)] = {"file": None, "model_name": model_name}
            continue
        module = algorithm.inference_model(arrays, state, pid, final_round)
        tensors, extra = _split_state(module)
        save_file(tensors, str(tmp / client_file(pid)), metadata=meta)
        clients[str(pid)] = _entry(client_file(pid), module, tensors, extra, model_name=model_name)
    index = {
        **meta, "evaluates": kind.evaluates, "score": kind.score, "round": final_round,
        "input_shape": list(data.input_shape), "num_classes": data.num_classes,
        "config": "config.yaml", "global": global_entry, "clients": clients,
        "rebuild": ("fedkd.load_model(run_dir, client=None | partition id): the method's client "
                    "algorithm from config.yaml (input_shape, num_classes from here), its "
                    "global_model (global file) or inference_model (client file) built with the "
                    "seeded initialization, then load_state_dict(strict) of the file's tensors "
                    "plus extra_state; eval mode, CPU"),
    }
    (tmp / INDEX).write_text(json.dumps(index, indent=2))
    out = run_dir / MODEL_DIR
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """A safetensors file's tensors; anything else (a pickle, a torch file) is refused unread."""
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc}); fedkd loads saved "
                         f"models from safetensors only, never from a pickle") from None


def load_model(run_dir: str | Path, client: int | None = None) -> nn.Module:
    """The model a run's client evaluated last (`client` = its partition id), or with
    `client=None` the run's global model (an error for methods without one), for inference:
    an `nn.Module` on the CPU in eval mode."""
    run_dir = Path(run_dir)
    folder = run_dir / MODEL_DIR
    if not (folder / INDEX).is_file():
        raise FileNotFoundError(f"{folder / INDEX}: no saved model in {run_dir} (a run saves it "
                                f"when it completes)")
    index = json.loads((folder / INDEX).read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{folder / INDEX}: format {index.get('format')!r}, expected {FORMAT!r}")
    cfg = from_yaml((run_dir / "config.yaml").read_text())
    algorithm = build_algorithm(cfg, tuple(index["input_shape"]), int(index["num_classes"]))
    method, clients = index["method"], index["clients"]
    if client is None:
        if index["global"] is None:
            raise ValueError(f"{method} has no global model: each client evaluates its own; "
                             f"pass client=<partition id> (0..{len(clients) - 1})")
        entry, file = index["global"], GLOBAL_FILE
    else:
        if isinstance(client, bool) or not isinstance(client, int) or str(client) not in clients:
            raise ValueError(f"client={client!r}: {run_dir} has clients 0..{len(clients) - 1}")
        entry = clients[str(client)]
        if entry["file"] is None:  # a client without state: built as its evaluate built it
            server = folder / SERVER_FILE
            arrays = _read_tensors(server) if server.exists() else {}
            return algorithm.inference_model(arrays, {}, client, int(index["round"])).to(CPU).eval()
        # file names are fixed by the partition id, never taken from the index
        file = GLOBAL_FILE if entry["file"] == GLOBAL_FILE else client_file(client)
        if entry["file"] != file:
            raise ValueError(f"{folder / INDEX}: client {client} names {entry['file']!r}, "
                             f"expected {file!r}")
        if file == GLOBAL_FILE:
            entry = index["global"]
    module = (algorithm.global_model({}) if file == GLOBAL_FILE
              else algorithm.inference_model({}, {}, client, int(index["round"])))
    assert module is not None, f"{method} saved a global model but builds none"
    state: dict[str, Any] = dict(_read_tensors(folder / file))
    state.update(entry.get("extra_state") or {})
    module.load_state_dict(state, strict=True)
    return module.to(CPU).eval()
