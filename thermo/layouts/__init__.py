"""Dashboard layouts shipped with thermo (JSON): `thermo dashboard RUN --layout attention`."""
