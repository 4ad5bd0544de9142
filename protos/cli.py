"""Command-line helpers shared by the stages."""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when there is one worth showing (not None, not an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or isinstance(action, argparse._StoreTrueAction):
            return action.help
        return super()._get_help_string(action)
