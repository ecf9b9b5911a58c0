"""The one exception type the CLI turns into a one-line error and a non-zero exit."""

import click


class UserError(click.ClickException):
    """Bad input: the message says what is wrong and what to do. Exit code 2."""

    exit_code = 2

    def show(self, file=None):
        click.echo(f"Error: {self.format_message()}", err=True, file=file)
