"""Tests of ``course_utils.grading``: one module per grading module, plus the registry walk."""
