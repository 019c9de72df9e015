"""Cohort I/O: study references, loading and validation, weak labels, subject-level splits."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


class StudyError(Exception):
    """Bad input for one study: names the file and the problem.

    The jobs catch exactly this type and turn it into a ``status = "failed"`` row.
    """

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # picklable across Ray workers
        return (StudyError, (self.path, self.problem))


@dataclass(frozen=True)
class StudyRef:
    """Where one study's files are; paths are absolute (or URIs), ``seg_path`` None if unlabeled."""

    patient_id: str
    study_id: str
    suv_path: str
    ct_path: str
    seg_path: str | None
    split: str | None = None
    diagnosis: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
