# nbgrader configuration of the course (nbgrader 0.9). nbgrader reads this file from the
# directory it runs in; run its commands from the repository root, or from a course
# directory holding a copy of this file and a `solutions/` folder.
#
#   solutions/<assignment>/<notebook>.ipynb       source: solutions, visible + hidden tests
#   exercises/<assignment>/<notebook>.ipynb       release: what students get (committed)
#   submitted/<student>/<assignment>/...          collected work       (git-ignored)
#   autograded/, feedback/, gradebook.db          grading artefacts    (git-ignored)
#
# See README "For instructors" for the commands.
import os

from nbconvert.preprocessors import ClearMetadataPreprocessor, CSSHTMLHeaderPreprocessor
from nbgrader.preprocessors import (
    AssignLatePenalties,
    CheckCellMetadata,
    ClearHiddenTests,
    GetGrades,
    IgnorePattern,
    LimitOutput,
    SaveAutoGrades,
)

from course_utils.grading.nbgrader_ext import RobustExecute

c = get_config()  # noqa: F821 (provided by traitlets when it loads this file)

# --- where things are -------------------------------------------------------------------
# The course root is this file's folder; COURSE_NBGRADER_ROOT points elsewhere.
c.CourseDirectory.root = os.environ.get("COURSE_NBGRADER_ROOT", os.path.dirname(os.path.abspath(__file__)))
c.CourseDirectory.course_id = "llms-from-scratch"
c.CourseDirectory.source_directory = "solutions"
# nbgrader's release folder is normally release/<assignment>/; ours is exercises/<assignment>/.
c.CourseDirectory.release_directory = "exercises"
c.CourseDirectory.submitted_directory = "submitted"
c.CourseDirectory.autograded_directory = "autograded"
c.CourseDirectory.feedback_directory = "feedback"
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "feedback"]

# --- what students see -----------------------------------------------------------------------
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"

# --- running students' notebooks --------------------------------------------------------------
# Per-cell time limit in seconds. The slowest graded cell (chapter 4's GPT checks) takes
# about 2 s on a laptop CPU; the largest demo cell (building GPT-2 small, 124M
# parameters, and generating a few tokens in full mode) about 10 s. 120 s leaves room
# for slow, shared machines while an infinite loop still costs only two minutes.
c.Execute.timeout = 120
c.Execute.startup_timeout = 120  # starting a kernel that imports torch on a busy machine
# A cell that runs past the limit is interrupted and scores zero; the rest still runs.
c.Execute.interrupt_on_timeout = True

# RobustExecute = nbgrader's Execute + grading through kernel crashes + an output cap.
c.RobustExecute.max_kernel_restarts = 3
c.RobustExecute.max_output_chars = 100_000
c.Autograde.autograde_preprocessors = [
    RobustExecute,
    IgnorePattern,
    ClearMetadataPreprocessor,
    LimitOutput,
    SaveAutoGrades,
    AssignLatePenalties,
    CheckCellMetadata,
]
c.LimitOutput.max_lines = 200
c.LimitOutput.max_traceback = 100

# A graded cell a student deleted is put back (with a note) and run.
c.OverwriteCells.add_missing_cells = True

# Feedback shows each cell's result but not the hidden tests' code (they stay reusable).
c.GenerateFeedback.preprocessors = [GetGrades, ClearHiddenTests, CSSHTMLHeaderPreprocessor]
