"""Energy accounting: joules per trained token and where they went (docs/energy.md).

- :mod:`lowbw.energy.profiles` -- hardware profiles (compute rate, busy / idle power, sources).
- :mod:`lowbw.energy.network` -- network energy models (``link_class``, ``intensity``, ``power``).
- :mod:`lowbw.energy.account` -- timeline -> :class:`EnergyReport`.
- :mod:`lowbw.energy.meters` -- measured energy (Zeus/NVML, RAPL) or an honest "modelled".
"""

from lowbw.energy.account import EnergyReport, NodeEnergy, account, account_timeline, timeline_usage
from lowbw.energy.meters import (
    MEASURED, MODELLED, EnergyMeter, Measurement, NullMeter, RaplMeter, ZeusMeter, select_meter,
)
from lowbw.energy.network import (
    NETWORK_MODELS, IntensityModel, LinkClassModel, NetworkEnergyModel, PowerModel, make_network_model,
    register_network_model,
)
from lowbw.energy.profiles import PROFILES, HardwareProfile, get_profile, profiles_for_ranks, register_profile

__all__ = [
    "EnergyReport", "NodeEnergy", "account", "account_timeline", "timeline_usage",
    "MEASURED", "MODELLED", "EnergyMeter", "Measurement", "NullMeter", "RaplMeter", "ZeusMeter", "select_meter",
    "NETWORK_MODELS", "IntensityModel", "LinkClassModel", "NetworkEnergyModel", "PowerModel", "make_network_model",
    "register_network_model", "PROFILES", "HardwareProfile", "get_profile", "profiles_for_ranks",
    "register_profile",
]
