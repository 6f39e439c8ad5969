"""Baseline editors (MEND, MALMEN, RLEdit, UltraEdit), each a small choice of the shared machinery."""
