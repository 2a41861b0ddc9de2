"""Calibration data, observers, SmoothQuant, INT8 recipes and the accuracy guard."""
