module github.com/zgolden/zgolden

go 1.26.8

require (
	github.com/mistifyio/go-zfs/v3 v3.0.1
	github.com/moby/sys/mountinfo v0.7.3
	github.com/sirupsen/logrus v1.10.2
)

require (
	github.com/google/uuid v1.2.0 // indirect
	github.com/moby/locker v1.0.1 // indirect
	golang.org/x/sys v0.49.0 // indirect
)
