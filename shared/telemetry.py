"""No usage reports from the model stack: a fleet on someone's desktops talks to its own servers and nothing else.

OpenVINO sends "usage data" to Google Analytics unless its consent file says no: `import openvino` reports itself
(openvino.tools.ovc, at import), every model conversion reports its steps, NNCF its compression calls. Both ask
openvino_telemetry, which counts a missing consent file (`~/intel/openvino_telemetry`, written by OpenVINO's
`opt_in_out --opt_out`) as consent; the only other way out it offers is looking like a CI job (CI=true, which
changes other libraries' behaviour too). Hugging Face's libraries report to their hub unless
HF_HUB_DISABLE_TELEMETRY (or DO_NOT_TRACK) is set.

`opt_out()`, called at the entry of every sdfleet process that may load the model stack (the `sdfleet`
command, and the `worker` and `modeltools` packages, so `python -m modeltools.steps` and the pool children
too), before any of it is imported:
- sets HF_HUB_DISABLE_TELEMETRY=1 and DO_NOT_TRACK=1 unless they are set (a value the user gave wins; the
  processes this one starts inherit them);
- declines OpenVINO's consent in this process, as the consent file saying "0" would, without writing to the
  user's home: openvino_telemetry's consent check answers DECLINED (once it is imported: a finder on
  sys.meta_path patches it as it loads, so a process that never loads it pays nothing), and an instance
  already made stops sending. Nothing is sent, no client ID file is written.

SDFLEET_LIBRARY_TELEMETRY=true (a setting: shared/settings.py) leaves all of this to the libraries and their
own consent (OpenVINO's consent file, Hugging Face's variables). tests/shared/test_telemetry.py watches a process
import and run the model stack with socket lookups audited."""

from __future__ import annotations

import importlib.machinery
import os
import sys

ENV_DEFAULTS = {"HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}
OPT_IN_VARIABLE = "SDFLEET_LIBRARY_TELEMETRY"
_CHECKER = "openvino_telemetry.utils.opt_in_checker"
_TRUE = {"1", "true", "t", "yes", "y", "on"}  # what pydantic reads as true


def opted_in() -> bool:
    return os.environ.get(OPT_IN_VARIABLE, "").strip().lower() in _TRUE


def opt_out() -> bool:
    """Decline the model stack's telemetry in this process (see the module's doc); idempotent. False when the
    user opted in (SDFLEET_LIBRARY_TELEMETRY=true) and nothing was changed."""
    if opted_in():
        return False
    for name, value in ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if _CHECKER in sys.modules:
        _decline(sys.modules[_CHECKER])
    elif not any(isinstance(f, _DeclineWhenLoaded) for f in sys.meta_path):
        sys.meta_path.insert(0, _DeclineWhenLoaded())
    return True


def _declined(self, enable_opt_in_dialog=True, disable_in_ci=False):
    return sys.modules[_CHECKER].ConsentCheckResult.DECLINED


def _decline(checker_module) -> None:
    """openvino_telemetry's consent check declines; an instance made before this (its singleton) stops."""
    checker_module.OptInChecker.check = _declined
    main = sys.modules.get("openvino_telemetry.main")
    telemetry = getattr(main, "Telemetry", None)
    instance = getattr(telemetry, "_SingletonMetaClass__single_instance", None)
    if instance is not None:
        instance.consent = False


class _DeclineWhenLoaded:
    """A meta path finder for openvino_telemetry's consent checker alone: the module is found and loaded as
    usual, then declines before anyone can ask it."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _CHECKER:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            if not opted_in():
                _decline(module)

        spec.loader.exec_module = exec_module
        return spec
