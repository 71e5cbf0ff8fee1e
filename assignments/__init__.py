"""The course's assignment tooling (instructor edition only): `python -m assignments release | grade |
grade-all | autograder`. See assignments/README.md."""
