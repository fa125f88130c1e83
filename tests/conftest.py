"""Each report starts with the hardware it ran on (tests/hardware.py)."""
from hardware import describe


def pytest_report_header(config):
    return describe()
