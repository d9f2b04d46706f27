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
# The exchange (nbgrader release/collect for a shared JupyterHub) lives inside the course, so formgrader finds
# a writable one; `make formgrader` creates it. This course collects with `make grade` instead.
c.Exchange.root = os.path.join(c.CourseDirectory.root, "exchange")

# Learner notebooks ship without outputs; the stub learners replace.
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"


def _stubs_by_place():
    """ClearSolutions whose stub for a top-level answer region (a decision cell) does not raise.

    Function bodies keep ``raise NotImplementedError()``; a decision cell gets a comment and keeps its
    ``name = None`` lines, so Run All of an unsolved notebook goes on (course_lib.notebook). Hidden tests fail
    on both, so either scores 0.
    """
    from nbgrader.converters import GenerateAssignment
    from nbgrader.preprocessors import ClearSolutions

    class ClearSolutionsByPlace(ClearSolutions):
        answer_stub = "# YOUR CODE HERE: replace each None above with your answer"

        def _replace_solution_region(self, cell, language):
            begins = [ln for ln in cell.source.split("\n") if self.begin_solution_delimeter in ln]
            top = [not ln[:1].isspace() for ln in begins]
            if cell.cell_type != "code" or not any(top):
                return super()._replace_solution_region(cell, language)
            if not all(top):
                raise RuntimeError("a cell mixes top-level and indented solution regions: split it\n" + cell.source)
            saved = self.code_stub
            self.code_stub = dict(saved, **{language: self.answer_stub})
            try:
                return super()._replace_solution_region(cell, language)
            finally:
                self.code_stub = saved

    default = GenerateAssignment.class_traits()["preprocessors"].default()
    return [ClearSolutionsByPlace if p is ClearSolutions else p for p in default]


c.GenerateAssignment.preprocessors = _stubs_by_place()
# Generated files beside the notebooks (artifacts, checkpoints) are never released.
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "feedback", "artifacts", "*.pt", "*.png"]

# For plain `nbgrader autograde` only: `make grade` (grading_cli) repairs, sandboxes and scores itself
# (docs/grading.md). Learners' warnings, logging and progress bars go to stderr: never let them zero a test.
c.IgnorePattern.enabled = True
c.IgnorePattern.pattern = r"(?s).*"
# Put back deleted or metadata-stripped graded cells instead of leaving them ungraded.
c.OverwriteCells.add_missing_cells = True
c.Execute.timeout = 300
