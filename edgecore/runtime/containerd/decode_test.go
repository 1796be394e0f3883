package containerd

import (
	"testing"
	"time"

	eventsapi "github.com/containerd/containerd/api/events"
	"github.com/containerd/containerd/api/types"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tetheredge/tether/edgecore/cri"
)

func envelope(t testing.TB, topic string, m proto.Message) *types.Envelope {
	t.Helper()
	a, err := anypb.New(m)
	require.NoError(t, err)
	return &types.Envelope{Namespace: "k8s.io", Topic: topic, Event: a, Timestamp: timestamppb.New(time.Unix(100, 0))}
}

func TestDecode(t *testing.T) {
	exited := time.Unix(200, 5).UTC()
	recv := time.Unix(300, 0)
	for _, tt := range []struct {
		name string
		env  *types.Envelope
		want cri.Event
		ok   bool
		err  bool
	}{
		{"start", envelope(t, "/tasks/start", &eventsapi.TaskStart{ContainerID: "c", Pid: 7}),
			cri.Event{ContainerID: "c", Kind: cri.EventStart, At: time.Unix(100, 0).UTC()}, true, false},
		{"exit of the init process", envelope(t, "/tasks/exit", &eventsapi.TaskExit{ContainerID: "c", ID: "c", ExitStatus: 3, ExitedAt: timestamppb.New(exited)}),
			cri.Event{ContainerID: "c", Kind: cri.EventExit, ExitCode: 3, At: exited}, true, false},
		{"exit of an exec", envelope(t, "/tasks/exit", &eventsapi.TaskExit{ContainerID: "c", ID: "exec-1", ExitStatus: 5}), cri.Event{}, false, false},
		{"oom", envelope(t, "/tasks/oom", &eventsapi.TaskOOM{ContainerID: "c"}),
			cri.Event{ContainerID: "c", Kind: cri.EventOOM, At: time.Unix(100, 0).UTC()}, true, false},
		{"other topic", envelope(t, "/tasks/create", &eventsapi.TaskCreate{ContainerID: "c"}), cri.Event{}, false, false},
		{"no payload", &types.Envelope{Topic: "/tasks/exit"}, cri.Event{}, false, false},
		{"wrong payload type", envelope(t, "/tasks/exit", &eventsapi.TaskOOM{ContainerID: "c"}), cri.Event{}, false, true},
		{"no timestamp", &types.Envelope{Topic: "/tasks/oom", Event: envelope(t, "", &eventsapi.TaskOOM{ContainerID: "c"}).Event},
			cri.Event{ContainerID: "c", Kind: cri.EventOOM, At: recv}, true, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, ok, err := decode(tt.env, recv)
			require.Equal(t, tt.err, err != nil, "%v", err)
			require.Equal(t, tt.ok, ok)
			require.Equal(t, tt.want, got)
		})
	}
	require.Equal(t, `namespace=="k8s.io",topic~="^/tasks/"`, eventFilter("k8s.io"))
}

// FuzzDecode feeds envelopes as they come off the wire: decode must never
// panic, and whatever it reports has a container id and a known kind.
func FuzzDecode(f *testing.F) {
	for _, env := range []*types.Envelope{
		envelope(f, "/tasks/start", &eventsapi.TaskStart{ContainerID: "c", Pid: 7}),
		envelope(f, "/tasks/exit", &eventsapi.TaskExit{ContainerID: "c", ID: "c", ExitStatus: 3}),
		envelope(f, "/tasks/oom", &eventsapi.TaskOOM{ContainerID: "c"}),
	} {
		b, err := proto.Marshal(env)
		require.NoError(f, err)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var env types.Envelope
		if proto.Unmarshal(b, &env) != nil {
			return
		}
		ev, ok, err := decode(&env, time.Now())
		if err != nil || !ok {
			return
		}
		require.NotEmpty(t, ev.ContainerID)
		require.Contains(t, []cri.EventKind{cri.EventStart, cri.EventExit, cri.EventOOM}, ev.Kind)
	})
}
