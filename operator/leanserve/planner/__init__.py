"""The planner: the cheapest configuration that meets the SLA, with its arithmetic shown. Pure: no I/O."""
