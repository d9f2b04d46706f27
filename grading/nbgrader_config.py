"""nbgrader configuration of the course: grading/ is the course root.

solutions/ is the source directory (instructor notebooks with solutions and hidden tests), notebooks/ the
release directory (what learners get). Both sit beside grading/, hence the relative names.
"""
import os

c = get_config()  # noqa: F821 - provided by nbgrader when it loads this file

c.CourseDirectory.root = os.path.dirname(os.path.abspath(__file__))
c.CourseDirectory.course_id = "opt-reg-peft"
c.CourseDirectory.source_directory = "../solutions"
c.CourseDirectory.release_directory = "../notebooks"
c.CourseDirectory.db_url = "sqlite:///" + os.path.join(c.CourseDirectory.root, "gradebook.db")

# Learner notebooks ship without outputs; the stub learners replace.
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
# Generated files beside the notebooks (artifacts, checkpoints) are never released.
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "feedback", "artifacts", "*.pt", "*.png"]

# For plain `nbgrader autograde` only: `make grade` (grading_cli) repairs, sandboxes and scores itself
# (docs/grading.md). Learners' warnings, logging and progress bars go to stderr: never let them zero a test.
c.IgnorePattern.enabled = True
c.IgnorePattern.pattern = r"(?s).*"
# Put back deleted or metadata-stripped graded cells instead of leaving them ungraded.
c.OverwriteCells.add_missing_cells = True
c.Execute.timeout = 300
