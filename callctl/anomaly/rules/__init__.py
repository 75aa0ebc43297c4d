"""The built-in anomaly rules, one module each; importing them registers them, in the
order passes run them and reports list them."""
from callctl.anomaly.rules import frequency, ultra_short, declined_repeat, off_hours, blast  # noqa: F401,I001
