"""A fleet simulator and capacity planner that run servekit's real scheduler, KV cache
manager, router and limiter on a virtual clock, with the GPU replaced by a step-time model.

    from servekit.sim import load_scenario, simulate
    result = simulate(load_scenario("scenario.toml"))
    print(result.format())

No torch at import: only ``servekit sim profile`` (:mod:`servekit.sim.profile`) loads an engine.
"""

from servekit.sim.errors import InfeasibleError, SimConfigError
from servekit.sim.frontend import FrontendCost
from servekit.sim.results import SimResult
from servekit.sim.scenario import (
    SLO,
    GatewayConfig,
    ReplicaConfig,
    Scenario,
    load_scenario,
    scenario_from_dict,
)
from servekit.sim.simulator import Simulator, arrival_trace, simulate
from servekit.sim.specs import DeviceSpec, ModelSpec, device_spec, model_spec
from servekit.sim.steptime import (
    ProfiledModel,
    RooflineModel,
    StepShape,
    StepTimeModel,
    fit_profile,
    shape_of,
)
from servekit.sim.workload import Workload, workload_from_dict

__all__ = [
    "SLO",
    "DeviceSpec",
    "FrontendCost",
    "GatewayConfig",
    "InfeasibleError",
    "ModelSpec",
    "ProfiledModel",
    "ReplicaConfig",
    "RooflineModel",
    "Scenario",
    "SimConfigError",
    "SimResult",
    "Simulator",
    "StepShape",
    "StepTimeModel",
    "Workload",
    "arrival_trace",
    "device_spec",
    "fit_profile",
    "load_scenario",
    "model_spec",
    "scenario_from_dict",
    "shape_of",
    "simulate",
    "workload_from_dict",
]
