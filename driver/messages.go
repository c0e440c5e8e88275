package driver

import (
	"fmt"
	"strings"
)

// The errors below are the user-facing refusals that more than one layer can reach: each is
// written once, here, so a backend and the driver say the same thing the same way.

// GoldenMissingError is the refusal for a project that has no golden at all.
func GoldenMissingError(project string) error {
	return fmt.Errorf("%w: golden %q does not exist", ErrNotFound, project)
}

// GenerationMissingError is the refusal for a generation number project does not have.
func GenerationMissingError(project string, n int) error {
	return fmt.Errorf("%w: golden %q has no generation %d", ErrNotFound, project, n)
}

// KindMismatchError refuses writing type=want data into a golden that holds type=have.
func KindMismatchError(project string, have, want Kind) error {
	return fmt.Errorf("%w: golden %q holds type=%s data, not %s", ErrInvalid, project, have, want)
}

// ColdDeniedError refuses a Create with cold=deny for a project that has no golden yet.
func ColdDeniedError(project string) error {
	return fmt.Errorf("%w: project %q has no golden yet and cold=deny was given; import or promote one first (zgolden golden import / promote)", ErrNoGolden, project)
}

// InUseError refuses removing generation n of project while volumes were cloned from it.
func InUseError(project string, n int, dependents []string) error {
	return fmt.Errorf("%w: generation %d of %q is the origin of %s", ErrGenerationInUse, n, project, strings.Join(dependents, ", "))
}

// DependentsError refuses removing a golden while the named volumes were cloned from it.
func DependentsError(dependents []string) error {
	return fmt.Errorf("%w: volumes %s were cloned from it; remove them first", ErrHasDependents, strings.Join(dependents, ", "))
}

// VanishedError reports a generation that a backend made but could not list right after.
func VanishedError(project string, n int) error {
	return fmt.Errorf("generation %d of golden %q vanished right after it was made", n, project)
}
