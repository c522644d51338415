"""Reports: the main study, the ablations, and the paired statistics behind their verdicts."""
