"""Training internals: the Lightning module and data module, schedules, callbacks, countermeasures.

Importing Lightning sets its loggers to INFO (accelerator found, product tips, 'fit stopped') and
gives its package logger a console handler of its own. The console shows only Lightning's
warnings, once, through the pipeline's handler: so both are undone here, right after the import.
"""

import logging

import lightning

for _name in ("lightning", "lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)
logging.getLogger("lightning").handlers = [
    h for h in logging.getLogger("lightning").handlers if h is not getattr(lightning, "_console", None)
]
