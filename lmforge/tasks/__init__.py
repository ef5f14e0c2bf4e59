"""Every task by name (an explicit dict, no import magic): pretraining objectives and fine-tuning tasks."""

from lmforge.tasks.classification import ClassificationTask
from lmforge.tasks.clm import CLMTask
from lmforge.tasks.mlm import MLMTask
from lmforge.tasks.ner import NERTask

TASKS: dict[str, type] = {
    "mlm": MLMTask,
    "wwm-mlm": MLMTask,
    "clm": CLMTask,
    "classify": ClassificationTask,
    "ner": NERTask,
}
FINETUNE_TASKS: dict[str, type] = {"classify": ClassificationTask, "ner": NERTask}
